//! Lenient value parsing shared by the dialects: the hosted APIs' clients send numbers and
//! booleans as JSON numbers, JSON strings ("512", "7.5") or form fields, and booleans as
//! `true`/`false`, `"yes"`/`"no"`, `"1"`/`"0"`. Every failure names the field and says what was
//! expected; nothing malformed becomes a default.

use serde_json::Value;

use super::output::JobError;
use crate::schedulers::SchedulerSpec;

/// A boolean from `true`/`false`, `"true"`/`"false"`, `"yes"`/`"no"`, `"1"`/`"0"`, `1`/`0`
/// (case-insensitive). `null` is `None`.
pub fn bool_value(field: &str, v: &Value) -> Result<Option<bool>, JobError> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        Value::Number(n) if n.as_u64() == Some(0) => Ok(Some(false)),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(Some(true)),
        Value::String(s) => bool_str(field, s),
        other => Err(expected(field, "true/false or yes/no", other)),
    }
}

/// As [`bool_value`] for a form field or query string. An empty string is `None`.
pub fn bool_str(field: &str, s: &str) -> Result<Option<bool>, JobError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "true" | "yes" | "1" | "on" => Ok(Some(true)),
        "false" | "no" | "0" | "off" => Ok(Some(false)),
        _ => Err(JobError::invalid(
            field,
            format!("`{field}` must be true/false or yes/no. Given: {s:?}"),
        )),
    }
}

/// An integer from a JSON number (a float with no fraction is accepted) or a numeric string.
/// `null` and `""` are `None`.
pub fn i64_value(field: &str, v: &Value) -> Result<Option<i64>, JobError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                Ok(Some(f as i64))
            } else {
                Err(expected(field, "an integer", v))
            }
        }
        Value::String(s) => i64_str(field, s),
        other => Err(expected(field, "an integer", other)),
    }
}

/// As [`i64_value`] for text.
pub fn i64_str(field: &str, s: &str) -> Result<Option<i64>, JobError> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    if let Ok(i) = t.parse::<i64>() {
        return Ok(Some(i));
    }
    match t.parse::<f64>() {
        Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
        _ => Err(JobError::invalid(
            field,
            format!("`{field}` must be an integer. Given: {s:?}"),
        )),
    }
}

/// An unsigned 64-bit integer (seeds up to 2^64 - 1) from a number or a numeric string.
pub fn u64_value(field: &str, v: &Value) -> Result<Option<u64>, JobError> {
    match v {
        Value::Number(n) if n.as_u64().is_some() => Ok(n.as_u64()),
        Value::String(s) if s.trim().parse::<u64>().is_ok() => Ok(s.trim().parse().ok()),
        _ => match i64_value(field, v)? {
            None => Ok(None),
            Some(i) if i >= 0 => Ok(Some(i as u64)),
            Some(i) => Err(JobError::invalid(
                field,
                format!("`{field}` must be >= 0. Given: {i}"),
            )),
        },
    }
}

/// A finite number from a JSON number or a numeric string. `null` and `""` are `None`.
pub fn f64_value(field: &str, v: &Value) -> Result<Option<f64>, JobError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| expected(field, "a number", v)),
        Value::String(s) => f64_str(field, s),
        other => Err(expected(field, "a number", other)),
    }
}

/// As [`f64_value`] for text.
pub fn f64_str(field: &str, s: &str) -> Result<Option<f64>, JobError> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Some(f)),
        _ => Err(JobError::invalid(
            field,
            format!("`{field}` must be a number. Given: {s:?}"),
        )),
    }
}

/// A string field; numbers are accepted as their decimal text. `null` is `None`.
pub fn string_value(field: &str, v: &Value) -> Result<Option<String>, JobError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(expected(field, "a string", other)),
    }
}

/// Checks `lo <= v <= hi`, with the dialect's field name in the message.
pub fn check_range<T>(field: &str, v: T, lo: T, hi: T) -> Result<T, JobError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if v < lo || v > hi {
        return Err(JobError::invalid(
            field,
            format!("`{field}` must be between {lo} and {hi}. Given: {v}"),
        ));
    }
    Ok(v)
}

/// A scheduler name in any spelling the dialects use ("DPMSolverMultistepScheduler", "DPM++ 2M
/// Karras", "Euler a", ...). Unknown names fail with the accepted ones listed.
pub fn scheduler(field: &str, name: &str) -> Result<SchedulerSpec, JobError> {
    SchedulerSpec::parse(name).map_err(|e| JobError::invalid(field, e.to_string()))
}

fn expected(field: &str, what: &str, given: &Value) -> JobError {
    let shown = match given {
        Value::String(s) => format!("{s:?}"),
        other => {
            let mut t = other.to_string();
            if t.len() > 64 {
                t.truncate(64);
                t.push('…');
            }
            t
        }
    };
    JobError::invalid(field, format!("`{field}` must be {what}. Given: {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_booleans_as_strings() {
        assert_eq!(i64_value("w", &json!("512")).unwrap(), Some(512));
        assert_eq!(i64_value("w", &json!(512.0)).unwrap(), Some(512));
        assert_eq!(i64_value("w", &json!(null)).unwrap(), None);
        assert_eq!(i64_value("w", &json!("")).unwrap(), None);
        assert!(i64_value("w", &json!("51.5")).is_err());
        assert!(i64_value("w", &json!([1])).is_err());
        assert_eq!(f64_value("g", &json!("7.5")).unwrap(), Some(7.5));
        assert!(f64_value("g", &json!("NaN")).is_err());
        assert_eq!(bool_value("b", &json!("yes")).unwrap(), Some(true));
        assert_eq!(bool_value("b", &json!("No")).unwrap(), Some(false));
        assert_eq!(bool_value("b", &json!(true)).unwrap(), Some(true));
        let e = bool_value("b", &json!("maybe")).unwrap_err();
        assert_eq!(e.parameter.as_deref(), Some("b"));
        assert_eq!(
            u64_value("seed", &json!("18446744073709551615")).unwrap(),
            Some(u64::MAX)
        );
        assert!(u64_value("seed", &json!(-3)).is_err());
    }

    #[test]
    fn ranges_name_the_field_and_limit() {
        let e = check_range("steps", 0, 1, 50).unwrap_err();
        assert_eq!(e.message, "`steps` must be between 1 and 50. Given: 0");
        assert_eq!(check_range("steps", 30, 1, 50).unwrap(), 30);
    }
}
