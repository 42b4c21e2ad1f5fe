//! Errors for values read off the wire that this crate cannot interpret.

/// A PRM field held a value this crate does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrmError {
    /// An enumerated field (opcode, status, nic_interface, ...) held an unknown value.
    #[error("unknown {field} value {value:#x}")]
    UnknownValue {
        /// The PRM name of the field, e.g. `"opcode"`.
        field: &'static str,
        /// The raw value that came.
        value: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::PrmError;

    #[test]
    fn message_names_field_and_value() {
        let e = PrmError::UnknownValue {
            field: "opcode",
            value: 0x999,
        };
        assert_eq!(e.to_string(), "unknown opcode value 0x999");
    }
}
