//! A shared-memory lane between a shard and a worker on the same host: the worker's fp32
//! gradient and the shard's fp32 weights cross it instead of the TCP connection, which then
//! carries only the small messages that say when (a push's head, a pull's answer).
//!
//! Why: a loopback TCP transfer of the cnn's slice costs the kernel two copies and both
//! ends' CPU, and in sync every worker waits for it each step; through shared memory each
//! direction is one `memcpy` on each side.
//!
//! How it is made safe:
//! - the shard creates the memory (a sealed `memfd`: it can never shrink or grow, so a peer
//!   cannot make the shard's accesses fault) and offers it only on a connection whose peer
//!   has already proven the token and holds a worker's seat;
//! - the worker opens it through `/proc/<shard pid>/fd/<fd>` (the kernel allows that only to
//!   a process of the same user) and proves it mapped that memory by echoing a random nonce
//!   the shard wrote into it, which never crossed the socket;
//! - the shard never computes on the shared bytes: a push is copied out first and then
//!   checked like any other (finite, bounded), so a worker scribbling on its lane only harms
//!   its own pushes; the number of lanes and their bytes are bounded by the shard.
//!
//! Layout: a 64-byte header (the nonce first), then the push area, then the pull area, each
//! `4 * values` bytes of native-endian `f32` (both ends share one host).

use memmap2::MmapRaw;
use std::fs::File;

/// Bytes before the push area (the nonce, then room).
const HEADER: usize = 64;
/// The proof that a worker mapped the lane it was offered.
pub const LANE_NONCE_LEN: usize = 16;
pub type LaneNonce = [u8; LANE_NONCE_LEN];

/// Why a lane could not be made or opened (the link then stays on TCP).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("shared-memory lanes need Linux")]
    Unsupported,
    #[error("shared memory: {0}")]
    Io(#[from] std::io::Error),
    #[error("the lane offered is {got} bytes, expected {expected}")]
    Size { got: u64, expected: u64 },
    #[error("random nonce: {0}")]
    Random(String),
}

/// One lane's memory, as either end maps it.
pub struct Lane {
    map: MmapRaw,
    values: usize,
    /// The shard's memfd (kept open: the worker opens it through `/proc`); `None` on the
    /// worker.
    _file: File,
}

/// Bytes of a lane for a slice of `values`.
pub fn lane_len(values: usize) -> u64 {
    (HEADER + 8 * values) as u64
}

impl Lane {
    /// The shard's side: new sealed shared memory for a slice of `values`, with a fresh nonce
    /// in its header. Returns the lane, the path a same-user process opens it by, and the
    /// nonce the worker must echo.
    pub fn create(values: usize) -> Result<(Lane, String, LaneNonce), LaneError> {
        let (file, path) = sealed_memory(lane_len(values))?;
        let map = MmapRaw::map_raw(&file)?;
        let mut nonce = [0u8; LANE_NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| LaneError::Random(e.to_string()))?;
        // SAFETY: the mapping is `lane_len(values)` bytes long and no peer has it yet.
        unsafe { std::ptr::copy_nonoverlapping(nonce.as_ptr(), map.as_mut_ptr(), nonce.len()) };
        let lane = Lane {
            map,
            values,
            _file: file,
        };
        Ok((lane, path, nonce))
    }

    /// The worker's side: maps the lane at `path` for a slice of `values` and reads the
    /// nonce to echo.
    pub fn open(path: &str, values: usize) -> Result<(Lane, LaneNonce), LaneError> {
        if !cfg!(target_os = "linux") {
            return Err(LaneError::Unsupported);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        // The mapping's own length is what every access below relies on.
        let map = MmapRaw::map_raw(&file)?;
        let expected = lane_len(values);
        if map.len() as u64 != expected {
            return Err(LaneError::Size {
                got: map.len() as u64,
                expected,
            });
        }
        let mut nonce = [0u8; LANE_NONCE_LEN];
        // SAFETY: the mapping holds at least the header.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr(), nonce.as_mut_ptr(), nonce.len()) };
        let lane = Lane {
            map,
            values,
            _file: file,
        };
        Ok((lane, nonce))
    }

    /// The push area (`pull: false`) or the pull area, for a worker that computes in the lane
    /// itself: a gradient written there and weights read from there need no copy (`write` and
    /// `read` see that their buffer is the area and leave it). The pointer is valid for
    /// `values()` floats while this lane lives; the shard writes the pull area only while
    /// this worker waits for a pull through it.
    pub fn area_ptr(&self, pull: bool) -> *mut f32 {
        let offset = HEADER + if pull { 4 * self.values } else { 0 };
        // SAFETY: `offset` and the area after it lie inside the mapping (`lane_len`); the
        // mapping is page-aligned and `offset` a multiple of 4.
        unsafe { self.map.as_mut_ptr().add(offset).cast::<f32>() }
    }

    /// The number of `f32`s in each area.
    pub fn values(&self) -> usize {
        self.values
    }

    /// Writes `values` (at most the slice's length) into the push area (`pull: false`) or
    /// the pull area; nothing to do when `values` is that area.
    pub fn write(&self, pull: bool, values: &[f32]) {
        self.write_at(pull, 0, values);
    }

    /// `write` from value `offset` of the area on (a piece of it: pieces can be written at
    /// once from several threads).
    pub fn write_at(&self, pull: bool, offset: usize, values: &[f32]) {
        let n = values.len().min(self.values.saturating_sub(offset));
        // SAFETY: `offset + n` is at most the area's `self.values` floats.
        let at = unsafe { self.area_ptr(pull).add(offset.min(self.values)) };
        if std::ptr::eq(values.as_ptr(), at) {
            return;
        }
        // SAFETY: `at` holds `n` floats; `copy` allows a caller's buffer that overlaps the
        // area. The peer may write the same memory at the same time (it is another process):
        // the bytes are then whatever they are, which the reader checks; nothing here depends
        // on them.
        unsafe { std::ptr::copy(values.as_ptr(), at, n) };
    }

    /// Copies the push area (`pull: false`) or the pull area into `out` (at most the slice's
    /// length); nothing to do when `out` is that area. The peer may be writing meanwhile: the
    /// copy is then torn, never unsafe to use, and the shard checks a push's values only
    /// after this copy.
    pub fn read(&self, pull: bool, out: &mut [f32]) {
        self.read_at(pull, 0, out);
    }

    /// `read` from value `offset` of the area on.
    pub fn read_at(&self, pull: bool, offset: usize, out: &mut [f32]) {
        let n = out.len().min(self.values.saturating_sub(offset));
        // SAFETY: as in `write_at`.
        let at = unsafe { self.area_ptr(pull).add(offset.min(self.values)) };
        if std::ptr::eq(out.as_ptr(), at) {
            return;
        }
        // SAFETY: as in `write_at`.
        unsafe { std::ptr::copy(at, out.as_mut_ptr(), n) };
    }
}

// SAFETY: the lane is plain shared memory addressed through a raw pointer that does not
// change for its life; every access copies whole values and tolerates concurrent writers.
unsafe impl Send for Lane {}
unsafe impl Sync for Lane {}

/// A sealed memfd of `len` bytes and the `/proc` path a process of the same user opens it by.
#[cfg(target_os = "linux")]
fn sealed_memory(len: u64) -> Result<(File, String), LaneError> {
    use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
    use std::os::fd::AsRawFd;
    let fd = memfd_create(
        "pstrain-lane",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(std::io::Error::from)?;
    ftruncate(&fd, len).map_err(std::io::Error::from)?;
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(std::io::Error::from)?;
    let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    Ok((File::from(fd), path))
}

#[cfg(not(target_os = "linux"))]
fn sealed_memory(_len: u64) -> Result<(File, String), LaneError> {
    Err(LaneError::Unsupported)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn both_ends_see_each_others_values_and_the_nonce() {
        let (shard, path, nonce) = Lane::create(5).expect("create");
        let (worker, echoed) = Lane::open(&path, 5).expect("open");
        assert_eq!(echoed, nonce);
        worker.write(false, &[1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut got = [0.0; 5];
        shard.read(false, &mut got);
        assert_eq!(got, [1.0, 2.0, 3.0, 4.0, 5.0]);
        shard.write(true, &[9.0, 8.0, 7.0, 6.0, 5.0]);
        worker.read(true, &mut got);
        assert_eq!(got, [9.0, 8.0, 7.0, 6.0, 5.0]);
        // The push area is untouched by the pull.
        shard.read(false, &mut got);
        assert_eq!(got, [1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn a_buffer_that_is_the_area_itself_is_left_as_it_is() {
        let (shard, path, _) = Lane::create(4).expect("create");
        let (worker, _) = Lane::open(&path, 4).expect("open");
        // The worker computes in its push area and reads its weights in its pull area.
        // SAFETY: both areas hold 4 floats and live as long as `worker`; nothing else writes
        // them during this test.
        let push = unsafe { std::slice::from_raw_parts_mut(worker.area_ptr(false), 4) };
        push.copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        worker.write(false, push);
        let mut got = [0.0; 4];
        shard.read(false, &mut got);
        assert_eq!(got, [1.0, 2.0, 3.0, 4.0]);
        shard.write(true, &[5.0, 6.0, 7.0, 8.0]);
        let pull = unsafe { std::slice::from_raw_parts_mut(worker.area_ptr(true), 4) };
        worker.read(true, pull);
        assert_eq!(pull, &[5.0, 6.0, 7.0, 8.0]);
        // A buffer overlapping an area (an offset view of it) is copied, not torn.
        let both = unsafe { std::slice::from_raw_parts_mut(worker.area_ptr(false), 8) };
        worker.read(true, &mut both[2..6]);
        assert_eq!(&both[..6], &[1.0, 2.0, 5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn pieces_land_at_their_offsets_and_nothing_past_the_area() {
        let (shard, path, _) = Lane::create(6).expect("create");
        let (worker, _) = Lane::open(&path, 6).expect("open");
        shard.write_at(true, 0, &[1.0, 2.0, 3.0]);
        shard.write_at(true, 3, &[4.0, 5.0, 6.0, 99.0]);
        shard.write_at(true, 7, &[99.0]);
        let mut got = [0.0; 6];
        worker.read(true, &mut got);
        assert_eq!(got, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut tail = [0.0; 4];
        worker.read_at(true, 4, &mut tail);
        assert_eq!(tail, [5.0, 6.0, 0.0, 0.0]);
        // The push area is untouched.
        worker.read(false, &mut got);
        assert_eq!(got, [0.0; 6]);
    }

    #[test]
    fn a_lane_of_another_size_is_refused() {
        let (_shard, path, _) = Lane::create(5).expect("create");
        assert!(matches!(Lane::open(&path, 6), Err(LaneError::Size { .. })));
    }

    #[test]
    fn the_memory_cannot_be_shrunk_by_the_worker() {
        let (_shard, path, _) = Lane::create(1000).expect("create");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        assert!(file.set_len(8).is_err(), "a sealed lane must not shrink");
        assert!(file.set_len(1 << 20).is_err(), "nor grow");
    }
}
