//! Certificates made with the openssl command for a test: CAs, and server or client
//! certificates they sign, in a directory that removes itself.

use std::path::PathBuf;
use std::process::Command;

/// A directory of certificates that removes itself.
pub struct Certs(PathBuf);

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Certs {
    /// An empty directory for `label`'s certificates.
    pub fn new(label: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("sy-tls-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Certs(dir)
    }

    /// The file `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Runs the openssl command in the directory; panics when it fails.
    pub fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `openssl req` making a P-256 key `key_name.key` and `out` (a self-signed certificate
    /// with `-x509`, a request otherwise) for `cn`.
    fn request(&self, x509: bool, key_name: &str, out: &str, cn: &str) {
        let (key, subject) = (format!("{key_name}.key"), format!("/CN={cn}"));
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        if x509 {
            args.extend(["-x509", "-days", "2"]);
        }
        args.extend(["-keyout", &key, "-out", out, "-subj", &subject]);
        self.openssl(&args);
    }

    /// A CA `name.pem` / `name.key`.
    pub fn ca(&self, name: &str) {
        self.request(true, name, &format!("{name}.pem"), name);
    }

    /// A certificate `name.pem` / `name.key` for `cn`, signed by CA `ca`, with `extension`.
    pub fn leaf(&self, name: &str, cn: &str, ca: &str, extension: &str) {
        self.request(false, name, &format!("{name}.csr"), cn);
        std::fs::write(self.path(&format!("{name}.ext")), extension).unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    /// A server certificate `name.pem` / `name.key` for `127.0.0.1` and `localhost`, with CN
    /// `cn`, signed by CA `ca`.
    pub fn server(&self, name: &str, cn: &str, ca: &str) {
        self.leaf(name, cn, ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    }

    /// A server certificate `name.pem` / `name.key` for `localhost` only (no IP address), signed
    /// by CA `ca`: `verify-full` to `localhost` passes, to `127.0.0.1` fails.
    pub fn server_for_localhost(&self, name: &str, ca: &str) {
        self.leaf(name, "localhost", ca, "subjectAltName=DNS:localhost\n");
    }
}
