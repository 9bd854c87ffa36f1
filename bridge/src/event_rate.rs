//! A goal in events per second (`500/s`, `600/m`), as `bridge sample --target` and the
//! control API take it (see `control::target` for how the hub steers toward it).

use std::{fmt, str::FromStr};

/// Highest goal accepted: more than any hub delivers, so a larger number is a typo.
const MAX_PER_SECOND: f64 = 1e9;

/// A goal in events per second: finite, above 0, at most [`MAX_PER_SECOND`].
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct EventRate(f64);

/// A goal that is not a positive number of events per second or minute.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "target rate `{0}` is invalid: it must be a number of events above 0, per second (`500/s`) \
     or per minute (`600/m`), at most 1e9/s"
)]
pub struct EventRateError(pub String);

impl EventRate {
    pub fn per_second(rate: f64) -> Result<Self, EventRateError> {
        if rate.is_finite() && rate > 0.0 && rate <= MAX_PER_SECOND {
            Ok(Self(rate))
        } else {
            Err(EventRateError(rate.to_string()))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

/// `500/s`, `600/m`, or a bare number of events per second.
impl FromStr for EventRate {
    type Err = EventRateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || EventRateError(text.to_owned());
        let trimmed = text.trim();
        let (number, per) = match trimmed.rsplit_once('/') {
            Some((number, "s")) => (number, 1.0),
            Some((number, "m")) => (number, 60.0),
            Some(_) => return Err(invalid()),
            None => (trimmed, 1.0),
        };
        let count: f64 = number.trim().parse().map_err(|_| invalid())?;
        Self::per_second(count / per).map_err(|_| invalid())
    }
}

impl fmt::Display for EventRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_parse_per_second_or_minute_and_refuse_the_rest() {
        assert_eq!("500/s".parse::<EventRate>().unwrap().get(), 500.0);
        assert_eq!("600/m".parse::<EventRate>().unwrap().get(), 10.0);
        assert_eq!("2.5".parse::<EventRate>().unwrap().get(), 2.5);
        for bad in [
            "0", "0/s", "-5/s", "fast", "500/h", "NaN", "inf", "1e10/s", "/s", "",
        ] {
            let err = bad.parse::<EventRate>().unwrap_err().to_string();
            assert!(
                err.contains("must be a number of events above 0"),
                "{bad}: {err}"
            );
        }
    }
}
