//! Retry delays: exponential backoff with jitter, the random source passed in so that a
//! simulation replays the same delays from the same seed.

use std::time::Duration;

/// base × 2^(attempt−1), capped at `max`, times a random 50–100 %.
pub fn backoff(base: Duration, max: Duration, attempt: i32, rng: &mut fastrand::Rng) -> Duration {
    let exp = base
        .saturating_mul(1u32 << (attempt.clamp(1, 31) - 1) as u32)
        .min(max);
    exp.mul_f64(0.5 + rng.f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_jitters_within_half() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let mut rng = fastrand::Rng::with_seed(1);
        for attempt in 1..40 {
            let full = base
                .saturating_mul(1 << (attempt.min(31) - 1) as u32)
                .min(max);
            let b = backoff(base, max, attempt, &mut rng);
            assert!(
                b >= full / 2 && b <= full,
                "attempt {attempt}: {b:?} vs {full:?}"
            );
        }
        let samples: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(base, max, 5, &mut rng)).collect();
        assert!(samples.len() > 1, "jitter varies");
    }
}
