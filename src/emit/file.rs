//! Append-only JSONL files: the embedded default output for window and rated records, and the
//! dead-letter file for refused events. Lines are whole (one `write_all` each, newline-terminated)
//! and the file is fsynced before a caller treats them as delivered.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct JsonlFile {
    path: PathBuf,
    file: File,
}

impl JsonlFile {
    pub fn open(path: &Path) -> io::Result<JsonlFile> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonlFile {
            path: path.to_path_buf(),
            file,
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
        self.file.write_all(&buffer)?;
        self.file.sync_data()?;
        Ok(count)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
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
}
