//! The wasi-nn error resource: a spec error code plus a message for the guest.

use super::bindings::errors::ErrorCode;

/// An error handed to the guest as a `wasi:nn/errors.error` resource.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code_name(*code))]
pub struct NnError {
    /// The spec's error code.
    pub code: ErrorCode,
    /// What happened and, where it helps, what to do.
    pub message: String,
}

/// The spec's kebab-case name of a code.
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidArgument => "invalid-argument",
        ErrorCode::InvalidEncoding => "invalid-encoding",
        ErrorCode::Timeout => "timeout",
        ErrorCode::RuntimeError => "runtime-error",
        ErrorCode::UnsupportedOperation => "unsupported-operation",
        ErrorCode::TooLarge => "too-large",
        ErrorCode::NotFound => "not-found",
        ErrorCode::Security => "security",
        ErrorCode::Unknown => "unknown",
    }
}

macro_rules! constructor {
    ($(#[$doc:meta])* $name:ident => $code:ident) => {
        $(#[$doc])*
        pub fn $name(message: impl Into<String>) -> Self {
            Self { code: ErrorCode::$code, message: message.into() }
        }
    };
}

impl NnError {
    constructor!(
        /// The caller passed something malformed.
        invalid_argument => InvalidArgument
    );
    constructor!(
        /// The model bytes are not in the claimed (or any known) encoding.
        invalid_encoding => InvalidEncoding
    );
    constructor!(
        /// The caller's deadline passed.
        timeout => Timeout
    );
    constructor!(
        /// The backend failed while running.
        runtime => RuntimeError
    );
    constructor!(
        /// Not supported by this host or build.
        unsupported => UnsupportedOperation
    );
    constructor!(
        /// Over a size cap.
        too_large => TooLarge
    );
    constructor!(
        /// No such model.
        not_found => NotFound
    );
    constructor!(
        /// Not granted to this plugin.
        security => Security
    );
}

impl From<candle_core::Error> for NnError {
    fn from(e: candle_core::Error) -> Self {
        Self::runtime(e.to_string())
    }
}
