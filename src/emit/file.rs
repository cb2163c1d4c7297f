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
    /// Some: a file that would grow past this many bytes is renamed to `<path>.1` (replacing
    /// the one before) and started anew, so it takes at most about twice this on disk.
    rotate_at: Option<u64>,
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
            rotate_at: None,
        })
    }

    /// `open`, rotated at `max_bytes` (see `rotate_at`). For the dead-letter file: a producer
    /// sending nothing but refused events must not fill the disk that holds the counts. Never
    /// for the rated output, whose every line a billing system needs.
    pub fn open_rotating(path: &Path, max_bytes: u64) -> io::Result<JsonlFile> {
        let mut file = JsonlFile::open(path)?;
        file.rotate_at = Some(max_bytes);
        Ok(file)
    }

    /// `<path>.1`: where the previous file goes at rotation.
    pub fn rotated_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let rotated = self.rotated_path();
        fs::rename(&self.path, &rotated)?;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        tracing::warn!(path = %self.path.display(), rotated = %rotated.display(), bytes = self.len,
            "file rotated; the one before it is gone");
        metrics::counter!(crate::telemetry::FILE_ROTATIONS).increment(1);
        let rotate_at = self.rotate_at;
        *self = JsonlFile::open(&self.path)?;
        self.rotate_at = rotate_at;
        Ok(())
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
        if self
            .rotate_at
            .is_some_and(|max| self.len > 0 && self.len + buffer.len() as u64 > max)
        {
            self.rotate()?;
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

    /// A rotating file never holds much more than its bound on disk, however much is written:
    /// the newest lines are in the file, the batch before the rotation in `.1`, older ones gone.
    #[test]
    fn a_rotating_file_stays_within_twice_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead-letter.jsonl");
        let mut file = JsonlFile::open_rotating(&path, 100).unwrap();
        for i in 0..50 {
            let line = format!("{{\"event\":{i:04}}}"); // 15 bytes with its newline
            file.append_durably([line.as_bytes()]).unwrap();
            let on_disk =
                fs::metadata(&path).unwrap().len() + fs::metadata(file.rotated_path()).map_or(0, |m| m.len());
            assert!(on_disk <= 200, "{on_disk} bytes after line {i}");
        }
        let current = fs::read_to_string(&path).unwrap();
        let rotated = fs::read_to_string(file.rotated_path()).unwrap();
        assert!(current.ends_with("{\"event\":0049}\n"), "{current}");
        assert_eq!(current.lines().count(), 50 % 6, "{current}");
        assert_eq!(rotated.lines().count(), 6, "{rotated}");
        assert!(rotated.ends_with("{\"event\":0047}\n"), "{rotated}");
        // One batch larger than the bound still goes in whole (a file of its own).
        let big = "x".repeat(300);
        file.append_durably([big.as_bytes()]).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{big}\n"));
        // Reopened, it keeps its place.
        drop(file);
        let mut file = JsonlFile::open_rotating(&path, 100).unwrap();
        file.append_durably([b"{}".as_slice()]).unwrap();
        assert_eq!(
            fs::read_to_string(file.rotated_path()).unwrap(),
            format!("{big}\n")
        );
    }
}
