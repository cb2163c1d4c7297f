//! Append-only JSONL files: the embedded default output for window and rated records, and the
//! dead-letter file for refused events. Lines are whole (one `write_all` each, newline-terminated)
//! and the file is fsynced before a caller treats them as delivered.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct JsonlFile {
    path: PathBuf,
    file: File,
    /// The length up to the last whole, fsynced line: a failed append is cut back to it, so a
    /// re-sent batch never starts glued to a fragment.
    len: u64,
    /// A failed append could not be cut back yet (the next append does it first).
    dirty: bool,
}

impl JsonlFile {
    /// Opens for appending; a partial last line (a crash mid-write: never delivered) is cut off.
    pub fn open(path: &Path) -> io::Result<JsonlFile> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let len = whole_lines_len(&file)?;
        if len < file.metadata()?.len() {
            tracing::warn!(path = %path.display(), keep = len, "cutting a partial last line (an unfinished write)");
            file.set_len(len)?;
            file.sync_data()?;
        }
        Ok(JsonlFile {
            path: path.to_path_buf(),
            file,
            len,
            dirty: false,
        })
    }

    /// Appends newline-terminated lines and fsyncs them.
    pub fn append_durably<'a>(&mut self, lines: impl IntoIterator<Item = &'a [u8]>) -> io::Result<usize> {
        let mut buffer = Vec::new();
        let mut count = 0;
        for line in lines {
            buffer.extend_from_slice(line);
            if !line.ends_with(b"\n") {
                buffer.push(b'\n');
            }
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        if self.dirty {
            self.file.set_len(self.len)?;
            self.dirty = false;
        }
        let written = self.file.write_all(&buffer).and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            // Whatever part reached the file goes: the caller re-sends the whole batch.
            self.dirty = self.file.set_len(self.len).is_err();
            return Err(error);
        }
        self.len += buffer.len() as u64;
        Ok(count)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The length of `file` up to and including its last newline.
fn whole_lines_len(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.read_exact_at(part, start)?;
        if let Some(newline) = part.iter().rposition(|byte| *byte == b'\n') {
            return Ok(start + newline as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The file emitter: the outbox from its cursor to a JSONL file (both record kinds), run by the
/// checkpoint thread after each checkpoint. A crash between the fsync and the cursor update
/// re-appends the same lines on restart: consumers upsert by `(record_id, revision)`.
pub struct FileEmitter {
    file: JsonlFile,
    cursor: u64,
}

pub const FILE_EMITTER: &str = "file";

impl FileEmitter {
    pub fn open(
        path: &Path,
        store: &crate::store::RocksStore,
    ) -> Result<FileEmitter, crate::store::StoreError> {
        let file = JsonlFile::open(path)?;
        let cursor = store.register_emitter(FILE_EMITTER)?;
        Ok(FileEmitter { file, cursor })
    }

    /// Appends everything pending; returns how many lines.
    pub fn deliver(&mut self, store: &crate::store::RocksStore) -> Result<usize, crate::store::StoreError> {
        let mut total = 0;
        loop {
            let pending = store.outbox_from(self.cursor, 10_000)?;
            let Some((last, _)) = pending.last() else {
                return Ok(total);
            };
            let last = *last;
            let count = self
                .file
                .append_durably(pending.iter().map(|(_, line)| line.as_slice()))?;
            for (_, line) in &pending {
                metrics::counter!(crate::telemetry::EMIT_RECORDS, "output" => FILE_EMITTER,
                    "kind" => super::line_kind(line))
                .increment(1);
            }
            self.cursor = last + 1;
            store.advance_emitter(FILE_EMITTER, self.cursor)?;
            total += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/out.jsonl");
        let mut file = JsonlFile::open(&path).unwrap();
        assert_eq!(
            file.append_durably([&b"{\"a\":1}"[..], &b"{\"b\":2}\n"[..]])
                .unwrap(),
            2
        );
        drop(file);
        let mut file = JsonlFile::open(&path).unwrap();
        file.append_durably([&b"{\"c\":3}"[..]]).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n"
        );
    }

    /// A partial last line (a crash mid-write) is cut off at open, so the re-sent batch starts
    /// on a line of its own instead of being glued to the fragment.
    #[test]
    fn a_partial_last_line_is_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":").unwrap();
        let mut file = JsonlFile::open(&path).unwrap();
        file.append_durably([b"{\"b\":2}".as_slice()]).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
    }
}
