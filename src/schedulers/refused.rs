//! diffusers scheduler classes that clients may name but that cannot sample a Stable Diffusion
//! model: each is refused by name with the reason and working alternatives, rather than being
//! reported as unknown or silently replaced by another sampler.

use crate::{Error, Result};

/// A refused class: its normalised spellings (as in `NamedSpec::aliases`), why, and names
/// `SchedulerSpec::parse` accepts instead.
struct Refused {
    class: &'static str,
    aliases: &'static [&'static str],
    reason: &'static str,
    alternatives: &'static [&'static str],
}

const REFUSED: &[Refused] = &[
    Refused {
        class: "IPNDMScheduler",
        aliases: &["ipndm"],
        reason: "it ignores the model's trained noise schedule (it runs its own sin^2 schedule on \
                 timesteps in [0, 1]), so a Stable Diffusion UNet, trained on timesteps 0..999 of \
                 its beta schedule, is asked for the wrong noise level at every step and the \
                 result is noise; PLMS applies the same 4th-order multistep rule on the model's \
                 own schedule",
        alternatives: &["PLMS", "DEIS", "DPM++ 2M"],
    },
    Refused {
        class: "KarrasVeScheduler",
        aliases: &["karrasve"],
        reason: "it is the stochastic sampler of Karras et al. for variance-exploding \
                 unconditional models (noise levels up to 100 on an unscaled input, a separate \
                 correction call), not for a variance-preserving latent model like Stable \
                 Diffusion",
        alternatives: &["Euler Karras", "DPM++ 2M Karras", "LMS Karras"],
    },
    Refused {
        class: "ScoreSdeVeScheduler",
        aliases: &["scoresdeve"],
        reason: "it is the predictor-corrector sampler of score-based variance-exploding SDE \
                 models (NCSN++), which predict a score, not the noise or velocity a Stable \
                 Diffusion UNet predicts",
        alternatives: &["Euler a", "DPM++ 2M SDE", "DDPM"],
    },
    Refused {
        class: "DDIMInverseScheduler",
        aliases: &["ddiminverse"],
        reason: "it runs DDIM backwards, mapping an image latent to noise (inversion for \
                 editing), and does not generate images; for image-to-image, send an init image \
                 with a sampler",
        alternatives: &["DDIM", "Euler"],
    },
];

/// `Err` with the reason if the normalised name `key` is a refused class; `name` is the name as
/// the client gave it.
pub(crate) fn check(key: &str, name: &str) -> Result<()> {
    match REFUSED.iter().find(|r| r.aliases.contains(&key)) {
        Some(r) => Err(Error::Scheduler(format!(
            "scheduler `{name}` ({}) is not supported: {}. Use instead: {}",
            r.class,
            r.reason,
            r.alternatives.join(", ")
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::SchedulerSpec;
    use super::REFUSED;
    use crate::Error;

    #[test]
    fn refused_classes_give_the_reason_and_alternatives() {
        for (name, why, alternative) in [
            ("IPNDM", "trained noise schedule", "PLMS"),
            ("IPNDMScheduler", "[0, 1]", "DEIS"),
            ("ipndm_scheduler", "wrong noise level", "DPM++ 2M"),
            ("KarrasVeScheduler", "variance-exploding", "Euler Karras"),
            ("KarrasVe", "unconditional", "DPM++ 2M Karras"),
            ("ScoreSdeVeScheduler", "score", "Euler a"),
            ("score_sde_ve", "variance-exploding", "DPM++ 2M SDE"),
            ("DDIMInverseScheduler", "inversion", "DDIM"),
            ("ddim inverse", "does not generate", "Euler"),
        ] {
            let err = match SchedulerSpec::parse(name) {
                Err(Error::Scheduler(msg)) => msg,
                other => panic!("{name}: expected a scheduler error, got {other:?}"),
            };
            assert!(err.contains(name), "{err}");
            assert!(err.contains("not supported"), "{err}");
            assert!(err.contains(why), "{name}: {err}");
            assert!(err.contains(alternative), "{name}: {err}");
        }
    }

    #[test]
    fn alternatives_are_accepted_names() {
        for refused in REFUSED {
            assert!(!refused.alternatives.is_empty(), "{}", refused.class);
            for &alternative in refused.alternatives {
                assert!(
                    SchedulerSpec::parse(alternative).is_ok(),
                    "{}: {alternative}",
                    refused.class
                );
            }
        }
    }

    #[test]
    fn refused_names_are_not_shown_as_accepted() {
        let shown = SchedulerSpec::accepted_names();
        for refused in REFUSED {
            let stem = refused.class.trim_end_matches("Scheduler");
            assert!(!shown.iter().any(|s| s.contains(stem)), "{stem}");
        }
    }
}
