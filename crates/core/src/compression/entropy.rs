//! A lossless stage after the codecs: a section of bytes (ternary digits, top-k's index gaps
//! and int8 values) coded by rANS over its own byte frequencies, or stored as it is where
//! coding would not make it smaller. Why: what the codecs write is far from uniform (a
//! ternary difference is mostly zero digits, top-k's gaps mostly small), so a slow link
//! carries the same values in fewer bytes, at the cost of a pass over them at each end.
//!
//! A section: its decoded length (varint), a mode byte (0 stored, 1 coded), then the bytes
//! as they are, or the coded length (varint), 256 symbol frequencies (varints summing to
//! `1 << PROB_BITS`) and the rANS stream: the final values of its four interleaved states
//! (big-endian), then the bytes the encoder shed, in the order the decoder takes them back.
//! Decoding checks all of it as hostile input: the length against the caller's bound, the
//! table's sum, the states' range, the stream neither cut short nor longer than its
//! symbols, and the states it ends in.

use super::CodecError;

/// Frequencies sum to `1 << PROB_BITS`.
const PROB_BITS: u32 = 12;
const PROB_SCALE: u32 = 1 << PROB_BITS;
/// The state stays in `[STATE_LOW, STATE_LOW << 8)` between symbols.
const STATE_LOW: u32 = 1 << 23;
/// Interleaved rANS states.
const STATES: usize = 4;
const STORED: u8 = 0;
const CODED: u8 = 1;

/// The largest section of `len` bytes: its header and the bytes stored as they are.
pub(super) fn max_section_len(len: usize) -> usize {
    varint_len(len as u64) + 1 + len
}

/// Appends `bytes` as a section to `out`: coded where that is smaller, else stored.
pub(super) fn encode_section(bytes: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    if !bytes.is_empty() {
        write_varint(bytes.len() as u64, out);
        out.push(CODED);
        code(bytes, out);
        if out.len() - start <= max_section_len(bytes.len()) {
            return;
        }
        out.truncate(start);
    }
    store_section(bytes, out);
}

/// Appends `bytes` as a stored section: its length, the mode, the bytes as they are.
pub(super) fn store_section(bytes: &[u8], out: &mut Vec<u8>) {
    write_varint(bytes.len() as u64, out);
    out.push(STORED);
    out.extend_from_slice(bytes);
}

/// Decodes the section at the start of `bytes` into `out` (cleared first), refusing one
/// whose decoded length is above `most`; returns the bytes it took. `codec` names the
/// payload in an error.
pub(super) fn decode_section(
    bytes: &[u8],
    most: usize,
    out: &mut Vec<u8>,
    codec: &'static str,
) -> Result<usize, CodecError> {
    read_section(bytes, most, out).map_err(|reason| CodecError::Section { codec, reason })
}

fn read_section(bytes: &[u8], most: usize, out: &mut Vec<u8>) -> Result<usize, &'static str> {
    out.clear();
    let mut reader = Reader { bytes, at: 0 };
    let len = reader.varint()?;
    if len > most as u64 {
        return Err("its decoded length is above the codec's bound");
    }
    let len = len as usize;
    match reader.byte()? {
        STORED => out.extend_from_slice(reader.take(len)?),
        CODED => {
            let coded = reader.varint()?;
            let table = DecodeTable::read(&mut reader)?;
            let coded = usize::try_from(coded).map_err(|_| cut_short())?;
            decode_stream(reader.take(coded)?, &table, len, out)?;
        }
        _ => return Err("its mode is neither stored nor coded"),
    }
    Ok(reader.at)
}

fn cut_short() -> &'static str {
    "it is cut short"
}

/// Codes `bytes` (not empty): the coded length, the table and the stream.
fn code(bytes: &[u8], out: &mut Vec<u8>) {
    let freqs = normalized_frequencies(bytes);
    let symbols = EncodeSymbols::new(&freqs);
    // Written from the end backwards, as the decoder reads it forwards: a symbol sheds at
    // most two bytes (its state falls from below 2^31 to at least 2^19), then the states.
    let mut stream = Back::new(2 * bytes.len() + 4 * STATES);
    // Symbol i goes through state i % STATES (independent chains, so the core overlaps
    // them); rANS codes the last symbol first, so that the decoder reads them in order.
    let mut x = [STATE_LOW; STATES];
    let tail = bytes.len() % STATES;
    let (whole, rest) = bytes.split_at(bytes.len() - tail);
    for (i, &b) in rest.iter().enumerate().rev() {
        x[i] = symbols.put(x[i], b, &mut stream);
    }
    for group in whole.rchunks_exact(STATES) {
        for i in (0..STATES).rev() {
            x[i] = symbols.put(x[i], group[i], &mut stream);
        }
    }
    // The decoder reads state 0 first, each big-endian.
    for state in x.iter().rev() {
        for b in state.to_le_bytes() {
            stream.push_if(b, true);
        }
    }
    let stream = stream.written();
    write_varint(stream.len() as u64, out);
    for f in freqs {
        write_varint(u64::from(f), out);
    }
    out.extend_from_slice(stream);
}

/// A buffer filled from its end towards its start.
struct Back {
    buf: Vec<u8>,
    start: usize,
}

impl Back {
    fn new(capacity: usize) -> Self {
        // One spare byte ahead, where `push_if` writes what it does not keep.
        Back {
            buf: vec![0; capacity + 1],
            start: capacity + 1,
        }
    }

    #[inline]
    fn push_if(&mut self, b: u8, keep: bool) {
        self.buf[self.start - 1] = b;
        self.start -= usize::from(keep);
    }

    fn written(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Each byte value's count scaled to sum to `PROB_SCALE`, every byte that occurs at least 1.
fn normalized_frequencies(bytes: &[u8]) -> [u32; 256] {
    // Four tables: a run of one byte value (most of a ternary difference is 0) would
    // otherwise wait on its own count at every step.
    let mut tables = [[0u32; 256]; 4];
    let mut groups = bytes.chunks_exact(4);
    for g in &mut groups {
        for (table, &b) in tables.iter_mut().zip(g) {
            table[usize::from(b)] += 1;
        }
    }
    for &b in groups.remainder() {
        tables[0][usize::from(b)] += 1;
    }
    let mut counts = [0u64; 256];
    for (s, c) in counts.iter_mut().enumerate() {
        *c = tables.iter().map(|t| u64::from(t[s])).sum();
    }
    let total = bytes.len() as u64;
    let mut freqs = [0u32; 256];
    for (f, &c) in freqs.iter_mut().zip(&counts) {
        if c > 0 {
            *f = ((c * u64::from(PROB_SCALE)) / total).max(1) as u32;
        }
    }
    // Rounding leaves the sum off by less than 256: the most frequent symbol takes the
    // difference (it holds at least 1/256 of the scale), or gives it a step at a time from
    // the largest frequencies where it cannot.
    let sum: u32 = freqs.iter().sum();
    let largest = (0..256).max_by_key(|&s| freqs[s]).unwrap_or(0);
    if sum <= PROB_SCALE {
        freqs[largest] += PROB_SCALE - sum;
    } else {
        let mut excess = sum - PROB_SCALE;
        while excess > 0 {
            let s = (0..256).max_by_key(|&s| freqs[s]).unwrap_or(0);
            let step = excess.min(freqs[s] - 1).max(1);
            freqs[s] -= step;
            excess -= step;
        }
    }
    freqs
}

/// A symbol's encoding step without a division (the reciprocal form of ryg's rans_byte).
#[derive(Clone, Copy, Default)]
struct EncodeSymbol {
    x_max: u32,
    rcp_freq: u32,
    rcp_shift: u32,
    bias: u32,
    cmpl_freq: u32,
}

struct EncodeSymbols([EncodeSymbol; 256]);

impl EncodeSymbols {
    fn new(freqs: &[u32; 256]) -> Self {
        let mut symbols = [EncodeSymbol::default(); 256];
        let mut start = 0;
        for (s, &freq) in symbols.iter_mut().zip(freqs) {
            if freq > 0 {
                *s = EncodeSymbol::new(start, freq);
            }
            start += freq;
        }
        EncodeSymbols(symbols)
    }

    /// Codes `byte` onto state `x`, shedding low bytes into `stream` first.
    #[inline]
    fn put(&self, mut x: u32, byte: u8, stream: &mut Back) -> u32 {
        let s = &self.0[usize::from(byte)];
        // At most two bytes, each written and kept or not without a branch (whether a
        // symbol sheds one is as unpredictable as the data).
        for _ in 0..2 {
            let shed = x >= s.x_max;
            stream.push_if(x as u8, shed);
            x = if shed { x >> 8 } else { x };
        }
        let q = ((u64::from(x) * u64::from(s.rcp_freq)) >> 32) as u32 >> s.rcp_shift;
        x.wrapping_add(s.bias)
            .wrapping_add(q.wrapping_mul(s.cmpl_freq))
    }
}

impl EncodeSymbol {
    fn new(start: u32, freq: u32) -> Self {
        let x_max = ((STATE_LOW >> PROB_BITS) << 8) * freq;
        let cmpl_freq = PROB_SCALE - freq;
        if freq < 2 {
            // x / 1 is x: a reciprocal of 2^32 - 1 and the bias make up for it.
            return EncodeSymbol {
                x_max,
                rcp_freq: u32::MAX,
                rcp_shift: 0,
                bias: start + PROB_SCALE - 1,
                cmpl_freq,
            };
        }
        let shift = 32 - (freq - 1).leading_zeros();
        let rcp_freq = (1u64 << (shift + 31)).div_ceil(u64::from(freq));
        EncodeSymbol {
            x_max,
            rcp_freq: rcp_freq as u32,
            rcp_shift: shift - 1,
            bias: start,
            cmpl_freq,
        }
    }
}

/// The decoder's table, per slot of the scale: its symbol, and its symbol's frequency (high
/// half) with the slot's offset from the symbol's start (low half): both read at once from
/// the state, neither waiting on the other.
struct DecodeTable {
    symbols: Box<[u8; PROB_SCALE as usize]>,
    steps: Box<[u32; PROB_SCALE as usize]>,
}

impl DecodeTable {
    fn read(reader: &mut Reader) -> Result<Self, &'static str> {
        let mut freq = [0u32; 256];
        let mut sum = 0u64;
        for f in freq.iter_mut() {
            let read = reader.varint()?;
            if sum + read > u64::from(PROB_SCALE) {
                return Err("its frequencies do not sum to the scale");
            }
            *f = read as u32;
            sum += read;
        }
        if sum != u64::from(PROB_SCALE) {
            return Err("its frequencies do not sum to the scale");
        }
        let mut symbols = Box::new([0u8; PROB_SCALE as usize]);
        let mut steps = Box::new([0u32; PROB_SCALE as usize]);
        let mut slot = 0;
        for (s, &f) in freq.iter().enumerate() {
            for offset in 0..f {
                symbols[slot] = s as u8;
                steps[slot] = (f << 16) | offset;
                slot += 1;
            }
        }
        Ok(DecodeTable { symbols, steps })
    }
}

/// Decodes `len` symbols of `stream` into `out`, refusing a stream that ends early, has
/// bytes left over, or does not return to the states the encoder began with.
fn decode_stream(
    stream: &[u8],
    table: &DecodeTable,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let mut x = [0u32; STATES];
    for (i, x) in x.iter_mut().enumerate() {
        let head: [u8; 4] = stream
            .get(4 * i..4 * i + 4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(cut_short)?;
        *x = u32::from_be_bytes(head);
        if !(STATE_LOW..STATE_LOW << 8).contains(x) {
            return Err("its rANS state is out of range");
        }
    }
    let mut at = 4 * STATES;
    out.resize(len, 0);
    for group in out.chunks_mut(STATES) {
        for (o, x) in group.iter_mut().zip(x.iter_mut()) {
            let slot = (*x & (PROB_SCALE - 1)) as usize;
            let step = table.steps[slot];
            *o = table.symbols[slot];
            *x = (step >> 16) * (*x >> PROB_BITS) + (step & 0xffff);
            // At most two bytes, taken or not without a branch; past the stream's end a
            // zero, and the position says so below.
            for _ in 0..2 {
                let take = *x < STATE_LOW;
                let b = u32::from(stream.get(at).copied().unwrap_or(0));
                *x = if take { (*x << 8) | b } else { *x };
                at += usize::from(take);
            }
        }
    }
    if at > stream.len() {
        return Err(cut_short());
    }
    if at != stream.len() || x != [STATE_LOW; STATES] {
        return Err("its stream does not end where its symbols do");
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, &'static str> {
        let b = *self.bytes.get(self.at).ok_or_else(cut_short)?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], &'static str> {
        let end = self.at.checked_add(len).ok_or_else(cut_short)?;
        let taken = self.bytes.get(self.at..end).ok_or_else(cut_short)?;
        self.at = end;
        Ok(taken)
    }

    /// A LEB128 varint of at most 64 bits.
    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint in its header is too long")
    }
}

fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).div_ceil(7).max(1)
}

#[cfg(test)]
#[path = "entropy_tests.rs"]
mod tests;
