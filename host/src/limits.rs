//! Resource limits of one plugin call, how a store enforces them, and how a violation becomes
//! exactly one [`LimitKind`].
//!
//! Each call runs in a fresh store: fuel bounds the instructions it may execute, the epoch
//! deadline bounds its wall-clock time (also while it awaits the host), and [`StoreLimiter`]
//! bounds its linear memory, tables and instances. Request and response sizes are checked by
//! the host before and after the call.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// The limits a plugin runs under. Every field has a safe default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Fuel per call (roughly, wasm instructions).
    pub fuel: u64,
    /// Wall-clock deadline per call, including time spent waiting on the host.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Total linear memory of the plugin's instance.
    pub max_memory: ByteSize,
    /// Most elements any one table may hold.
    pub max_table_elements: u64,
    /// Most core instances one component instance may create.
    pub max_instances: u32,
    /// Most tables one component instance may create.
    pub max_tables: u32,
    /// Most memories one component instance may create.
    pub max_memories: u32,
    /// Largest request (sum of tensor element bytes) a plugin is handed.
    pub max_request: ByteSize,
    /// Largest response a plugin may return.
    pub max_response: ByteSize,
    /// Most memory one model computation (a wasi-nn `compute`) may hold in intermediate values
    /// (activations, attention scores, scratch), reserved before it is allocated; over it, the
    /// guest gets a wasi-nn `too-large` error and may send a smaller batch.
    pub max_compute_memory: ByteSize,
    /// How long a call may go on running plugin code once its caller went away (its model
    /// computations end at once); past it the call is dropped at its next yield. Its slots
    /// stay taken until then, so hanging up and resending gains no concurrency.
    #[serde(with = "humantime_serde")]
    pub abandon_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: 10_000_000_000,
            timeout: Duration::from_secs(30),
            max_memory: ByteSize::mib(512),
            max_table_elements: 100_000,
            max_instances: 64,
            max_tables: 16,
            max_memories: 8,
            max_request: ByteSize::mib(64),
            max_response: ByteSize::mib(64),
            max_compute_memory: ByteSize::b(crate::nn::backend::DEFAULT_COMPUTE_BUDGET),
            abandon_grace: Duration::from_millis(100),
        }
    }
}

/// Which limit stopped a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// It ran out of fuel.
    Fuel,
    /// It ran past its wall-clock deadline.
    Deadline,
    /// It tried to grow its memory (or a table, or its instance count) past the cap.
    Memory,
    /// It recursed past the wasm stack.
    Stack,
}

impl LimitKind {
    /// Plain words for messages: "fuel", "deadline", "memory", "stack".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fuel => "fuel",
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Stack => "stack",
        }
    }
}

/// A host-side resource cap a guest ran into (e.g. wasi-nn tensor bytes held in the host).
/// Host functions raise it as a trap; the call is then reported as a memory-limit violation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: asked for {requested}, limit {limit}")]
pub struct HostLimitExceeded {
    /// What ran out ("wasi-nn tensor bytes", ...).
    pub what: &'static str,
    /// How much was asked for.
    pub requested: u64,
    /// The cap.
    pub limit: u64,
}

/// The record a [`StoreLimiter`] keeps of the first growth it refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What was being grown ("memory", "table", ...).
    pub what: &'static str,
    /// The size (bytes or elements) that was asked for.
    pub requested: u64,
    /// The cap it ran into.
    pub limit: u64,
}

/// Enforces [`Limits`] on a store's memories, tables and instances, and remembers the first
/// refusal so that a later trap (a guest that aborts on allocation failure) is reported as a
/// memory-limit violation rather than a bare `unreachable`.
#[derive(Debug)]
pub struct StoreLimiter {
    max_memory: u64,
    max_table_elements: u64,
    max_instances: usize,
    max_tables: usize,
    max_memories: usize,
    memory_in_use: u64,
    refusal: Option<Refusal>,
}

impl StoreLimiter {
    /// A limiter for one store.
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_memory: limits.max_memory.as_u64(),
            max_table_elements: limits.max_table_elements,
            max_instances: limits.max_instances as usize,
            max_tables: limits.max_tables as usize,
            max_memories: limits.max_memories as usize,
            memory_in_use: 0,
            refusal: None,
        }
    }

    /// The first growth refused, if any.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }

    /// The cap on the number of `what` ("instance", "table" or "memory") per instance.
    pub fn count_limit(&self, what: &str) -> Option<usize> {
        match what {
            "instance" => Some(self.max_instances),
            "table" => Some(self.max_tables),
            "memory" => Some(self.max_memories),
            _ => None,
        }
    }

    /// Linear memory handed out so far, summed over all memories of the store.
    pub fn memory_in_use(&self) -> u64 {
        self.memory_in_use
    }

    fn refuse(&mut self, what: &'static str, requested: u64, limit: u64) -> bool {
        self.refusal.get_or_insert(Refusal { what, requested, limit });
        false
    }
}

impl wasmtime::ResourceLimiter for StoreLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Memory is never freed inside a store, so a running sum over every memory is exact.
        let growth = desired.saturating_sub(current) as u64;
        let total = self.memory_in_use.saturating_add(growth);
        if total > self.max_memory {
            return Ok(self.refuse("memory", total, self.max_memory));
        }
        self.memory_in_use = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.max_table_elements {
            return Ok(self.refuse("table", desired as u64, self.max_table_elements));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.max_instances
    }

    fn tables(&self) -> usize {
        self.max_tables
    }

    fn memories(&self) -> usize {
        self.max_memories
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn memory_is_capped_across_all_memories() {
        let limits = Limits { max_memory: ByteSize::b(100), ..Limits::default() };
        let mut limiter = StoreLimiter::new(&limits);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        assert!(limiter.memory_growing(0, 40, None).unwrap(), "a second memory shares the budget");
        assert!(!limiter.memory_growing(40, 41, None).unwrap());
        assert_eq!(limiter.refusal(), Some(&Refusal { what: "memory", requested: 101, limit: 100 }));
        assert_eq!(limiter.memory_in_use(), 100);
    }

    #[test]
    fn first_refusal_is_kept() {
        let limits = Limits { max_memory: ByteSize::b(10), max_table_elements: 5, ..Limits::default() };
        let mut limiter = StoreLimiter::new(&limits);
        assert!(!limiter.table_growing(0, 6, None).unwrap());
        assert!(!limiter.memory_growing(0, 11, None).unwrap());
        assert_eq!(limiter.refusal().map(|r| r.what), Some("table"));
    }

    #[test]
    fn limits_parse_from_toml_with_units() {
        let limits: Limits =
            toml::from_str("fuel = 1000\ntimeout = \"250ms\"\nmax_memory = \"64 MiB\"\nmax_response = \"1KiB\"")
                .unwrap();
        assert_eq!(limits.fuel, 1000);
        assert_eq!(limits.timeout, Duration::from_millis(250));
        assert_eq!(limits.max_memory, ByteSize::mib(64));
        assert_eq!(limits.max_response, ByteSize::kib(1));
        assert_eq!(limits.max_tables, Limits::default().max_tables);
        assert!(toml::from_str::<Limits>("fuell = 1").is_err(), "typos are rejected");
    }
}
