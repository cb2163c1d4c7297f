//! Append-only JSONL files: the embedded default output for window records, and the dead-letter
//! file for refused events. Lines are whole (one `write_all` each, newline-terminated) and the
//! file is fsynced before a caller treats them as delivered.

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
