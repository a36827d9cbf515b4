//! Zstandard streams of any number of frames: a reader that decodes frame after frame (and skips
//! skippable frames), as `zstd -d` does, and a writer that compresses its input in independent
//! frames of [`FRAME`] bytes (memory stays bounded; any zstd tool reads the result).
//!
//! Pure Rust (ruzstd). Its encoder has one real level, close to zstd's level 1.

use std::io::{self, BufRead, Read, Write};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use ruzstd::encoding::{compress, CompressionLevel};

/// Uncompressed bytes per frame of [`Writer`].
pub const FRAME: usize = 8 << 20;

/// Decodes every frame of a zstd stream, in order.
pub struct Reader<R: BufRead> {
    src: R,
    dec: FrameDecoder,
    /// Whether `dec` holds a frame (finished or not) whose bytes may remain to collect.
    in_frame: bool,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not a zstd stream: {e}"),
    )
}

impl<R: BufRead> Reader<R> {
    /// A reader of `inner`; the first frame header is read at once, so a file that is not zstd
    /// fails here.
    pub fn new(inner: R) -> io::Result<Self> {
        let mut r = Self {
            src: inner,
            dec: FrameDecoder::new(),
            in_frame: false,
        };
        if !r.next_frame()? {
            return Err(invalid("the stream is empty"));
        }
        Ok(r)
    }

    /// Starts the next frame; false at the end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        self.in_frame = false;
        loop {
            if self.src.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => {
                    self.in_frame = true;
                    return Ok(true);
                }
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let want = u64::from(length);
                    let skipped = io::copy(&mut (&mut self.src).take(want), &mut io::sink())?;
                    if skipped != want {
                        return Err(invalid("a skippable frame is cut short"));
                    }
                }
                Err(e) => return Err(invalid(e)),
            }
        }
    }
}

impl<R: BufRead> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.dec.can_collect() == 0 && !self.dec.is_finished() {
                    self.dec
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(invalid)?;
                }
                let n = self.dec.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
            }
            if !self.next_frame()? {
                return Ok(0);
            }
        }
    }
}

/// Compresses what is written to it into frames of [`FRAME`] bytes; call [`Writer::finish`]
/// at the end (dropping it without that loses the last frame).
pub struct Writer<W: Write> {
    inner: W,
    buf: Vec<u8>,
    /// Frames written so far.
    frames: usize,
}

impl<W: Write> Writer<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(FRAME),
            frames: 0,
        }
    }

    fn flush_frame(&mut self) -> io::Result<()> {
        if self.buf.is_empty() && self.frames > 0 {
            return Ok(());
        }
        // Compressing from memory into memory: the encoder's reads and writes cannot fail.
        let mut frame = Vec::with_capacity(self.buf.len() / 3);
        compress(self.buf.as_slice(), &mut frame, CompressionLevel::Fastest);
        self.inner.write_all(&frame)?;
        self.frames += 1;
        self.buf.clear();
        Ok(())
    }

    /// Writes the last frame (an empty one if nothing was written, so the file is a valid,
    /// empty stream) and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_frame()?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME {
            self.flush_frame()?;
        }
        Ok(n)
    }

    /// Flushes the inner writer only: a frame ends at [`FRAME`] bytes or at `finish`.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| format!("line {} of the test text {}\n", i, i * 7919 % 1000))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn round_trips_over_several_frames_and_skips_skippable_ones() {
        // More than two frames' worth, written in odd-sized pieces.
        let data = text(800_000);
        assert!(data.len() > 2 * FRAME);
        let mut w = Writer::new(Vec::new());
        for piece in data.chunks(777_777) {
            w.write_all(piece).unwrap();
        }
        let mut z = w.finish().unwrap();
        assert!(z.len() < data.len() / 3, "{} of {}", z.len(), data.len());
        // A skippable frame (magic 0x184D2A5?, 4-byte length) at the end.
        z.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        z.extend_from_slice(&3u32.to_le_bytes());
        z.extend_from_slice(b"abc");
        let mut back = Vec::new();
        Reader::new(io::BufReader::new(z.as_slice()))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data, "{} bytes back of {}", back.len(), data.len());
    }

    #[test]
    fn bad_streams_are_errors() {
        assert!(Reader::new(io::BufReader::new(&b""[..])).is_err());
        assert!(Reader::new(io::BufReader::new(&b"plain text, not zstd"[..])).is_err());
        let mut w = Writer::new(Vec::new());
        w.write_all(&text(1000)).unwrap();
        let z = w.finish().unwrap();
        let mut back = Vec::new();
        let r = Reader::new(io::BufReader::new(&z[..z.len() / 2]))
            .and_then(|mut r| r.read_to_end(&mut back));
        assert!(r.is_err(), "a cut stream must not read as complete");
        // Empty input makes one empty frame, which reads back as nothing.
        let z = Writer::new(Vec::new()).finish().unwrap();
        assert!(!z.is_empty());
        let mut back = Vec::new();
        Reader::new(io::BufReader::new(z.as_slice()))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back.is_empty());
    }
}
