//! One module per model family.

pub mod bert;
