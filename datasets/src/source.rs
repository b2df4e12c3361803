//! Byte sources that may be gzip-compressed, and reads that turn short files into typed errors.

use std::fs::File;
use std::io::{self, BufReader, Cursor, ErrorKind, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::DatasetError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Bytes copied per step when reading a length taken from a header, so memory grows with the
/// data actually present rather than with what the header claims.
const CHUNK: usize = 64 * 1024;

/// A file's decoded bytes: decompressed when the file starts with the gzip signature (names
/// lie: `.gz` files get unpacked in place by browsers and tools), read as is otherwise.
pub(crate) struct Source {
    path: PathBuf,
    reader: Box<dyn Read>,
    gzip: bool,
    /// Size on disk; the decoded size too when `gzip` is false.
    disk_len: u64,
    /// Decoded bytes handed out so far.
    consumed: u64,
}

impl Source {
    pub(crate) fn open(path: &Path) -> Result<Self, DatasetError> {
        let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
        let disk_len = file
            .metadata()
            .map_err(|e| DatasetError::io(path, e))?
            .len();
        let mut file = BufReader::new(file);
        let mut head = [0u8; 2];
        let (n, result) = fill(&mut file, &mut head);
        result.map_err(|e| DatasetError::io(path, e))?;
        let gzip = head[..n] == GZIP_MAGIC;
        // The sniffed bytes are put back in front so both readers see the whole file.
        let whole = Cursor::new(head[..n].to_vec()).chain(file);
        let reader: Box<dyn Read> = if gzip {
            Box::new(MultiGzDecoder::new(whole))
        } else {
            Box::new(whole)
        };
        Ok(Source {
            path: path.to_owned(),
            reader,
            gzip,
            disk_len,
            consumed: 0,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The decoded length, known without reading only for uncompressed files.
    pub(crate) fn known_len(&self) -> Option<u64> {
        (!self.gzip).then_some(self.disk_len)
    }

    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Reads until `buf` is full or the data ends; returns how many bytes were read.
    /// `expected_total` is the decoded size the caller needs, for the error if the gzip stream
    /// itself is cut short.
    pub(crate) fn fill(
        &mut self,
        buf: &mut [u8],
        expected_total: u64,
    ) -> Result<usize, DatasetError> {
        let (n, result) = fill(&mut self.reader, buf);
        self.consumed += n as u64;
        match result {
            Ok(()) => Ok(n),
            // flate2 reports a stream cut mid-member as UnexpectedEof; for the user that is a
            // truncated download like any other.
            Err(e) if self.gzip && e.kind() == ErrorKind::UnexpectedEof => {
                Err(self.truncated(expected_total))
            }
            Err(e) => Err(self.read_error(e)),
        }
    }

    /// Fills `buf` completely, or fails with [`DatasetError::Truncated`].
    pub(crate) fn read_exact(
        &mut self,
        buf: &mut [u8],
        expected_total: u64,
    ) -> Result<(), DatasetError> {
        let n = self.fill(buf, expected_total)?;
        if n < buf.len() {
            return Err(self.truncated(expected_total));
        }
        Ok(())
    }

    /// Reads exactly `len` bytes without trusting `len` for the allocation up front.
    pub(crate) fn read_vec(
        &mut self,
        len: usize,
        expected_total: u64,
    ) -> Result<Vec<u8>, DatasetError> {
        let mut out = Vec::with_capacity(len.min(CHUNK));
        let mut chunk = vec![0u8; len.min(CHUNK)];
        while out.len() < len {
            let want = (len - out.len()).min(CHUNK);
            self.read_exact(&mut chunk[..want], expected_total)?;
            out.extend_from_slice(&chunk[..want]);
        }
        Ok(out)
    }

    /// Fails with [`DatasetError::TrailingBytes`] unless the data ends here.
    pub(crate) fn expect_end(&mut self) -> Result<(), DatasetError> {
        let expected = self.consumed;
        let mut probe = [0u8; 1];
        match fill(&mut self.reader, &mut probe) {
            (0, Ok(())) => Ok(()),
            (_, Ok(())) => Err(DatasetError::TrailingBytes {
                path: self.path.clone(),
                expected,
            }),
            // All data is there, but the gzip trailer (CRC and length) is not: the file is
            // damaged even though the pixels may be intact.
            (_, Err(e)) => Err(self.read_error(e)),
        }
    }

    pub(crate) fn truncated(&self, expected_total: u64) -> DatasetError {
        DatasetError::Truncated {
            path: self.path.clone(),
            expected: expected_total,
            actual: self.consumed,
        }
    }

    fn read_error(&self, source: io::Error) -> DatasetError {
        let path = self.path.clone();
        if self.gzip {
            DatasetError::Gzip { path, source }
        } else {
            DatasetError::Io { path, source }
        }
    }
}

/// Reads until `buf` is full, the data ends, or an error; the count is valid in every case so
/// errors can report how much data there was.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> (usize, io::Result<()>) {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (n, Err(e)),
        }
    }
    (n, Ok(()))
}
