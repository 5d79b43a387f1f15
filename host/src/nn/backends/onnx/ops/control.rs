//! `Constant` values (control flow itself, `If`, is compiled by the graph compiler).

use candle_core::Tensor;

use super::Node;
use crate::nn::error::NnError;

/// The value of a `Constant` node.
pub(crate) fn constant_value(node: &Node<'_>) -> Result<Tensor, NnError> {
    super::shape::constant_attr(node)
}
