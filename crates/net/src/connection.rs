//! One peer's TCP stream: reads and writes frames, each step under a deadline, and moves
//! tensor payloads straight between the socket and `f32` buffers (no per-element conversion
//! on little-endian hosts).

use crate::error::NetError;
use crate::frame::{Header, HEADER_LEN};
use crate::message::{Reply, Request};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

/// Bytes buffered per direction and connection.
const BUFFER: usize = 64 << 10;

type ReadSide = Box<dyn AsyncRead + Send + Sync + Unpin>;
type WriteSide = Box<dyn AsyncWrite + Send + Sync + Unpin>;

pub struct Connection {
    reader: BufReader<ReadSide>,
    writer: BufWriter<WriteSide>,
    /// Deadline for any one read or write once a frame is under way.
    io_timeout: Duration,
    peer: String,
    /// Both ends have the same IP address: the peer is on this host.
    same_host: bool,
}

async fn deadline<T>(
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = std::io::Result<T>>,
) -> Result<T, NetError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(NetError::Closed(what)),
        Ok(Err(e)) => Err(NetError::Io(e)),
        Err(_) => Err(NetError::Timeout(what)),
    }
}

/// Both ends of `stream` have the same IP address.
pub fn same_host(stream: &TcpStream) -> bool {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => local.ip() == peer.ip(),
        _ => false,
    }
}

/// Tensors travel as little-endian `f32`; on a big-endian host the bytes are swapped in place.
fn to_wire_order(values: &mut [f32]) {
    if cfg!(target_endian = "big") {
        for v in values {
            *v = f32::from_bits(v.to_bits().swap_bytes());
        }
    }
}

impl Connection {
    pub fn new(stream: TcpStream, io_timeout: Duration) -> Self {
        // Frames are written whole and answered at once: do not wait to coalesce.
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into());
        let same_host = same_host(&stream);
        let (r, w) = stream.into_split();
        let mut conn = Self::from_halves(Box::new(r), Box::new(w), peer, io_timeout);
        conn.same_host = same_host;
        conn
    }

    /// Whether the peer is on this host (both ends of the TCP connection have one IP
    /// address), where a shared-memory lane can replace the socket for tensors.
    pub fn same_host(&self) -> bool {
        self.same_host
    }

    /// Says whether the peer is on this host (for a connection made `over` another stream).
    pub fn on_same_host(mut self, same: bool) -> Self {
        self.same_host = same;
        self
    }

    /// A connection over another stream (TLS over TCP).
    pub fn over<S>(stream: S, peer: String, io_timeout: Duration) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::from_halves(Box::new(r), Box::new(w), peer, io_timeout)
    }

    fn from_halves(r: ReadSide, w: WriteSide, peer: String, io_timeout: Duration) -> Self {
        Connection {
            // Tensors bypass the buffers: reads and writes larger than them go straight
            // through.
            reader: BufReader::with_capacity(BUFFER, r),
            writer: BufWriter::with_capacity(BUFFER, w),
            io_timeout,
            peer,
            same_host: false,
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// Waits up to `idle` for the next frame's header. `Ok(None)` is a clean close between
    /// frames; a close inside the header is an error.
    pub async fn read_header(
        &mut self,
        idle: Duration,
        limit: u64,
    ) -> Result<Option<Header>, NetError> {
        let mut buf = [0u8; HEADER_LEN];
        let first = deadline(idle, "waiting for a frame", self.reader.read(&mut buf[..1])).await?;
        if first == 0 {
            return Ok(None);
        }
        deadline(
            self.io_timeout,
            "reading a frame header",
            self.reader.read_exact(&mut buf[1..]),
        )
        .await?;
        Ok(Some(Header::decode(&buf, limit)?))
    }

    pub async fn read_bytes(&mut self, n: usize) -> Result<Vec<u8>, NetError> {
        let mut buf = vec![0u8; n];
        deadline(
            self.io_timeout,
            "reading a payload",
            self.reader.read_exact(&mut buf),
        )
        .await?;
        Ok(buf)
    }

    /// Reads `out.len()` little-endian `f32`s directly into `out`.
    pub async fn read_f32s(&mut self, out: &mut [f32]) -> Result<(), NetError> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        deadline(
            self.io_timeout,
            "reading a tensor",
            self.reader.read_exact(bytes),
        )
        .await?;
        to_wire_order(out);
        Ok(())
    }

    /// Writes one frame: header, fixed part, then the tensor's bytes, and flushes.
    pub async fn write_frame(
        &mut self,
        kind: u16,
        head: &[u8],
        tensor: &[f32],
    ) -> Result<(), NetError> {
        let len = (head.len() + std::mem::size_of_val(tensor)) as u64;
        let header = Header { kind, len }.encode();
        let io = self.io_timeout;
        deadline(io, "writing a frame", self.writer.write_all(&header)).await?;
        deadline(io, "writing a frame", self.writer.write_all(head)).await?;
        if cfg!(target_endian = "big") {
            let mut swapped = tensor.to_vec();
            to_wire_order(&mut swapped);
            let bytes: &[u8] = bytemuck::cast_slice(&swapped);
            deadline(io, "writing a tensor", self.writer.write_all(bytes)).await?;
        } else {
            let bytes: &[u8] = bytemuck::cast_slice(tensor);
            deadline(io, "writing a tensor", self.writer.write_all(bytes)).await?;
        }
        deadline(io, "flushing a frame", self.writer.flush()).await
    }

    /// Writes one frame whose tensor is already encoded (a compressed push or pull).
    pub async fn write_frame_bytes(
        &mut self,
        kind: u16,
        head: &[u8],
        body: &[u8],
    ) -> Result<(), NetError> {
        let len = (head.len() + body.len()) as u64;
        let header = Header { kind, len }.encode();
        let io = self.io_timeout;
        deadline(io, "writing a frame", self.writer.write_all(&header)).await?;
        deadline(io, "writing a frame", self.writer.write_all(head)).await?;
        deadline(io, "writing a tensor", self.writer.write_all(body)).await?;
        deadline(io, "flushing a frame", self.writer.flush()).await
    }

    /// Reads `out.len()` bytes into `out` (a compressed tensor).
    pub async fn read_into(&mut self, out: &mut [u8]) -> Result<(), NetError> {
        deadline(
            self.io_timeout,
            "reading a tensor",
            self.reader.read_exact(out),
        )
        .await?;
        Ok(())
    }

    /// Sends a request's fixed part followed by `tensor` (a push's gradient slice).
    pub async fn send_request(
        &mut self,
        request: &Request,
        workers: usize,
        tensor: &[f32],
    ) -> Result<(), NetError> {
        self.write_frame(request.kind(), &request.encode(workers), tensor)
            .await
    }

    /// Sends a reply's fixed part followed by `tensor` (a pull's slice).
    pub async fn send_reply(
        &mut self,
        reply: &Reply,
        workers: usize,
        tensor: &[f32],
    ) -> Result<(), NetError> {
        self.write_frame(reply.kind(), &reply.encode(workers), tensor)
            .await
    }

    /// Reads a whole reply that carries no tensor, waiting up to `wait` for it; an error
    /// frame becomes `NetError::Remote`.
    pub async fn read_reply(
        &mut self,
        wait: Duration,
        limit: u64,
        workers: usize,
    ) -> Result<Reply, NetError> {
        let header = self
            .read_header(wait, limit)
            .await?
            .ok_or(NetError::Closed("before replying"))?;
        let payload = self.read_bytes(header.len as usize).await?;
        match Reply::decode(header.kind, &payload, workers)? {
            Reply::Error(f) => Err(NetError::Remote(f)),
            reply => Ok(reply),
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = self.writer.flush().await;
        let _ = self.writer.shutdown().await;
    }
}
