//! Errors raised while reading and validating configuration.
//!
//! Syntax and type errors stop loading at the first one (the TOML parser and
//! the `config` crate report one at a time). Validation of the parsed values
//! collects every problem it finds, so one `check-config` run shows them all.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong while loading a Switchyard configuration.
///
/// `Display` gives one line per problem and always names the offending key,
/// environment variable or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file (the config file or the users file) could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file this is: "config file" or "users file".
        what: &'static str,
        /// The path as it was opened.
        path: PathBuf,
        /// The operating system error.
        source: std::io::Error,
    },

    /// A file is not valid TOML, or a value has the wrong type or an unknown
    /// key (reported by the parser, which stops at the first such error).
    #[error("{origin}: {message}")]
    Parse {
        /// The file path, or `<string>` for configuration given as text.
        origin: String,
        /// The parser's message, including the key or line it concerns.
        message: String,
    },

    /// The configuration parsed but some values are invalid.
    #[error("{}", DisplayProblems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The validation problems, if this is [`ConfigError::Invalid`]; empty
    /// otherwise.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid(problems) => problems,
            _ => &[],
        }
    }
}

/// One invalid value: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the value came from, when it is not the main config (the
    /// users file, for example).
    pub file: Option<PathBuf>,
    /// The key, written as in the file: `proxy.listen`, `tables[2].phase`,
    /// `users[0].secret`. Values set from the environment name the variable too.
    pub key: String,
    /// What is wrong, and what would be accepted.
    pub message: String,
}

impl Problem {
    /// A problem with `key` in the main configuration.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: None,
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Formats a list of problems one per line.
struct DisplayProblems<'a>(&'a [Problem]);

impl fmt::Display for DisplayProblems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Turns a `toml` parse error into one line:
/// `line L, column C, in [section]: message`.
pub(crate) fn toml_error_line(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end().replace('\n', "; ");
    let Some(span) = err.span() else {
        return message;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    // Name the key: the table header the error falls under plus the key on
    // the error's line, so `unknown field `lisen`` becomes `proxy.lisen`.
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .collect();
    let is_header = |l: &&str| l.starts_with('[') && l.ends_with(']');
    let error_line = lines.get(line - 1).copied().unwrap_or("");
    if is_header(&error_line) {
        return format!("line {line}, column {column}: {message}");
    }
    let above = lines.get(..line - 1).unwrap_or(&[]);
    let section = above.iter().rposition(is_header).map(|at| {
        let header = above[at];
        match header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
            // Array of tables: name the entry by index, as validation does.
            Some(array) => {
                let index = above[..at].iter().filter(|l| **l == header).count();
                format!("{}[{index}]", array.trim())
            }
            None => header.trim_matches(['[', ']']).trim().to_string(),
        }
    });
    let key = error_line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches(['"', '\'']))
        .filter(|k| !k.is_empty());
    let path = match (section, key) {
        (Some(section), Some(key)) => format!("{section}.{key}"),
        (Some(section), None) => section,
        (None, Some(key)) => key.to_string(),
        (None, None) => return format!("line {line}, column {column}: {message}"),
    };
    format!("line {line}, column {column}, {path}: {message}")
}
