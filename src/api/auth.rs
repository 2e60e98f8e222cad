//! API keys, compared in constant time.

use subtle::ConstantTimeEq;

/// The keys the server accepts. With none configured every request is accepted (a server on a
/// private network); `serve` logs that at start.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        Self {
            keys: keys.into_iter().map(String::into_bytes).collect(),
        }
    }

    /// True when no key is configured: authentication is off.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `given` is one of the keys. Every configured key is compared, each in time that
    /// depends only on the lengths, so the answer's timing does not reveal a key's prefix.
    pub fn check(&self, given: &str) -> bool {
        if self.is_open() {
            return true;
        }
        let given = given.as_bytes();
        let mut found = subtle::Choice::from(0u8);
        for key in &self.keys {
            found |= key.as_slice().ct_eq(given);
        }
        found.into()
    }

    /// As [`ApiKeys::check`] for an optional key: a missing key is refused unless the server is
    /// open.
    pub fn check_opt(&self, given: Option<&str>) -> bool {
        match given {
            Some(key) => self.check(key),
            None => self.is_open(),
        }
    }
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("count", &self.keys.len())
            .finish()
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::new(["alpha".to_string(), "beta-key".to_string()]);
        assert!(keys.check("alpha"));
        assert!(keys.check("beta-key"));
        assert!(!keys.check("alph"));
        assert!(!keys.check("alphaa"));
        assert!(!keys.check(""));
        assert!(!keys.check_opt(None));
        let open = ApiKeys::default();
        assert!(open.check("anything") && open.check_opt(None));
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert("authorization", "bearer  abc ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }
}
