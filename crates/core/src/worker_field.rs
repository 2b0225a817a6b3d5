//! How one per-worker number is described once, for every surface: its key in the metrics file
//! and on the live page, its column, its Prometheus family, how two shards' views combine, and
//! how it travels (as one `u64`). `worker_stats.rs` declares every number through
//! `worker_numbers!`, so a new per-worker counter is one row there plus the line that counts it.

use crate::compression::CodecPair;

/// A per-worker number's value, as the surfaces show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Count(u64),
    /// A count of bytes (shown in megabytes; its name ends in `_bytes`).
    Bytes(u64),
    /// Seconds, or any other real quantity.
    Real(f64),
    /// The codecs a worker's link used (shown by name).
    Codecs(CodecPair),
}

impl Number {
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Count(n) | Number::Bytes(n) => n as f64,
            Number::Real(x) => x,
            Number::Codecs(_) => 0.0,
        }
    }

    /// The value as it travels: a count as itself, a real as its bits.
    pub fn to_raw(self) -> u64 {
        match self {
            Number::Count(n) | Number::Bytes(n) => n,
            Number::Real(x) => x.to_bits(),
            Number::Codecs(c) => c.to_raw(),
        }
    }

    /// Two values of the same field combined by `merge` (`First`: this one).
    fn combine(self, other: Number, merge: Merge) -> Number {
        match (self, other, merge) {
            (a, _, Merge::First) | (a @ Number::Codecs(_), _, _) => a,
            (Number::Count(a), Number::Count(b), Merge::Max) => Number::Count(a.max(b)),
            (Number::Count(a), Number::Count(b), Merge::Sum) => Number::Count(a.saturating_add(b)),
            (Number::Bytes(a), Number::Bytes(b), Merge::Max) => Number::Bytes(a.max(b)),
            (Number::Bytes(a), Number::Bytes(b), Merge::Sum) => Number::Bytes(a.saturating_add(b)),
            (a, b, Merge::Max) => Number::Real(a.as_f64().max(b.as_f64())),
            (a, b, Merge::Sum) => Number::Real(a.as_f64() + b.as_f64()),
        }
    }
}

impl std::fmt::Display for Number {
    /// Counts as integers, bytes as megabytes and reals with one decimal (seconds at a
    /// glance).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Number::Count(n) => n.fmt(f),
            Number::Bytes(n) => write!(f, "{:.1}", *n as f64 / 1e6),
            Number::Real(x) => write!(f, "{x:.1}"),
            Number::Codecs(c) => c.fmt(f),
        }
    }
}

/// A Rust type a per-worker number can have.
pub trait WorkerNumber: Copy {
    fn number(self) -> Number;
    /// From the value as it travelled (`Number::to_raw`); a count too large saturates.
    fn from_raw(raw: u64) -> Self;
}

impl WorkerNumber for u64 {
    fn number(self) -> Number {
        Number::Count(self)
    }
    fn from_raw(raw: u64) -> Self {
        raw
    }
}

impl WorkerNumber for u32 {
    fn number(self) -> Number {
        Number::Count(u64::from(self))
    }
    fn from_raw(raw: u64) -> Self {
        u32::try_from(raw).unwrap_or(u32::MAX)
    }
}

impl WorkerNumber for CodecPair {
    fn number(self) -> Number {
        Number::Codecs(self)
    }
    fn from_raw(raw: u64) -> Self {
        CodecPair::from_raw(raw)
    }
}

/// A per-worker count of bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl WorkerNumber for Bytes {
    fn number(self) -> Number {
        Number::Bytes(self.0)
    }
    fn from_raw(raw: u64) -> Self {
        Bytes(raw)
    }
}

impl WorkerNumber for f64 {
    fn number(self) -> Number {
        Number::Real(self)
    }
    fn from_raw(raw: u64) -> Self {
        f64::from_bits(raw)
    }
}

/// How two shards' views of one rank combine (every shard sees every gradient of a rank, but
/// times and leads differ per shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Shard 0's value.
    First,
    /// The largest of the shards' values.
    Max,
    /// The shards' values added (each shard sees its own slice's bytes).
    Sum,
}

/// A per-worker Prometheus family: `name` (with the `pstrain_worker_` prefix), its help, and
/// whether it is a counter (else a gauge).
#[derive(Debug, Clone, Copy)]
pub struct Exported {
    pub name: &'static str,
    pub help: &'static str,
    pub counter: bool,
}

impl Exported {
    pub const fn counter(name: &'static str, help: &'static str) -> Option<Exported> {
        Some(Exported {
            name,
            help,
            counter: true,
        })
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Option<Exported> {
        Some(Exported {
            name,
            help,
            counter: false,
        })
    }
}

/// One per-worker number, described for every surface.
#[derive(Clone, Copy)]
pub struct WorkerField<S> {
    /// Its key in the metrics file and in the live page's data.
    pub name: &'static str,
    /// Its column header in the run summary and on the live page (`None`: not a column).
    pub title: Option<&'static str>,
    /// Its own Prometheus family, if it has one.
    pub prometheus: Option<Exported>,
    pub merge: Merge,
    pub get: fn(&S) -> Number,
    /// Sets it from the value as it travelled (`Number::to_raw`).
    pub set: fn(&mut S, u64),
}

impl<S> std::fmt::Debug for WorkerField<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerField")
            .field("name", &self.name)
            .finish()
    }
}

impl<S> WorkerField<S> {
    /// Combines `other`'s value into `into`'s by this field's rule.
    pub fn merge_into(&self, into: &mut S, other: &S) {
        if self.merge != Merge::First {
            let merged = (self.get)(into).combine((self.get)(other), self.merge);
            (self.set)(into, merged.to_raw());
        }
    }
}

/// Declares the per-worker record: each row is a documented field with its type and its
/// `WorkerField` description (every `WorkerField` member but `get` and `set`, which the macro
/// writes). Produces the struct (with the staleness histogram appended) and `WORKER_FIELDS`.
macro_rules! worker_numbers {
    ($(#[$struct_doc:meta])* $vis:vis struct $record:ident {
        $( $(#[doc = $doc:literal])* $field:ident : $ty:ty { $($member:ident : $value:expr),* $(,)? } )*
    }) => {
        $(#[$struct_doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        $vis struct $record {
            $( $(#[doc = $doc])* pub $field: $ty, )*
            /// Counts per `STALENESS_BOUNDS` bucket.
            pub staleness_hist: [u64; STALENESS_BOUNDS.len()],
        }

        /// Every number of the per-worker record but the histogram, in the order the surfaces
        /// list them and the stats reply carries them.
        pub const WORKER_FIELDS: &[WorkerField<$record>] = &[$(
            WorkerField {
                $($member: $value,)*
                get: |w| WorkerNumber::number(w.$field),
                set: |w, raw| w.$field = WorkerNumber::from_raw(raw),
            },
        )*];
    };
}
pub(crate) use worker_numbers;
