//! Private temporary directories for the files a test writes (users files, configs).

use std::path::PathBuf;

use anyhow::Context as _;

/// A private directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `sy-<label>-<pid>-<random>`.
    pub fn new(label: &str) -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!(
            "sy-{label}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    /// Writes `text` to the file `name` in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
