//! The failures that have an exit code of their own; anything else exits 1.

/// A failure with its own exit code, carried in an `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Exit 2: bad arguments, or a request the service refused as invalid.
    #[error("{0}")]
    Usage(String),
    /// Exit 3: no such saga, escalation or parked message.
    #[error("{0}")]
    NotFound(String),
    /// Exit 4: credentials missing, wrong, or not allowed to do this.
    #[error("{0}")]
    Refused(String),
    /// Exit 5: the order failed (its result dict is already printed).
    #[error("the order failed")]
    OrderFailed,
}

impl Failure {
    pub const EXIT_ERROR: u8 = 1;
    pub const EXIT_USAGE: u8 = 2;
    pub const EXIT_NOT_FOUND: u8 = 3;
    pub const EXIT_REFUSED: u8 = 4;
    pub const EXIT_ORDER_FAILED: u8 = 5;

    pub fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => Self::EXIT_USAGE,
            Failure::NotFound(_) => Self::EXIT_NOT_FOUND,
            Failure::Refused(_) => Self::EXIT_REFUSED,
            Failure::OrderFailed => Self::EXIT_ORDER_FAILED,
        }
    }
}

/// The exit code of an error: its [`Failure`]'s, wherever in the chain, or 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map_or(Failure::EXIT_ERROR, Failure::code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn codes_survive_added_context() {
        let e: anyhow::Error = Failure::NotFound("no saga x".into()).into();
        let e = Err::<(), _>(e).context("showing a saga").unwrap_err();
        assert_eq!(exit_code(&e), 3);
        assert_eq!(exit_code(&anyhow::anyhow!("network")), 1);
        assert_eq!(exit_code(&Failure::Refused("x".into()).into()), 4);
    }
}
