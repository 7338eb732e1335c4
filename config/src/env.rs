//! Environment overrides: `SWITCHYARD_<SECTION>__<KEY>=value`.
//!
//! Only variables with a `__` are configuration keys; others with the
//! prefix (`SWITCHYARD_CONFIG`, `SWITCHYARD_LOG`) are left to the programs.
//! Names are matched case-insensitively, as the `config` crate does.

use std::collections::HashMap;

use crate::error::Problem;
use crate::raw::ENV_SECTIONS;
use crate::ENV_PREFIX;

/// The variables to hand to the `config` crate, and what they override.
pub(crate) struct Overrides {
    /// The variables that are configuration keys, name -> value.
    pub vars: HashMap<String, String>,
    /// Key path (`proxy.listen`) -> the variable that sets it.
    pub keys: HashMap<String, String>,
    /// Variables that look like configuration keys but name no section.
    pub problems: Vec<Problem>,
}

/// The process environment as UTF-8 pairs. A `SWITCHYARD_` variable that is
/// not UTF-8 is a problem; other variables that are not are skipped.
pub(crate) fn process_env() -> (HashMap<String, String>, Vec<Problem>) {
    let mut vars = HashMap::new();
    let mut problems = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => {
                vars.insert(name, value);
            }
            (Ok(name), Err(_)) if has_prefix(&name) => {
                problems.push(Problem::new(
                    format!("environment variable {name}"),
                    "value is not valid UTF-8",
                ));
            }
            _ => {}
        }
    }
    (vars, problems)
}

fn has_prefix(name: &str) -> bool {
    name.get(..ENV_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
}

/// Picks the configuration overrides out of `env`.
pub(crate) fn select_overrides(env: HashMap<String, String>) -> Overrides {
    let mut out = Overrides {
        vars: HashMap::new(),
        keys: HashMap::new(),
        problems: Vec::new(),
    };
    let sections = ENV_SECTIONS.join(", ");
    for (name, value) in env {
        if !has_prefix(&name) {
            continue;
        }
        let rest = name[ENV_PREFIX.len()..].to_ascii_lowercase();
        if !rest.contains("__") {
            continue;
        }
        let parts: Vec<&str> = rest.split("__").collect();
        let problem = match parts.as_slice() {
            [section, key] if ENV_SECTIONS.contains(section) && !key.is_empty() => {
                out.keys.insert(format!("{section}.{key}"), name.clone());
                out.vars.insert(name, value);
                continue;
            }
            ["tables", ..] => "[[tables]] cannot be set from the environment".to_string(),
            [section, _] if !ENV_SECTIONS.contains(section) => {
                format!("unknown section {section:?}; expected one of {sections}")
            }
            _ => format!("expected SWITCHYARD_<SECTION>__<KEY> with one of {sections} as the section"),
        };
        out.problems
            .push(Problem::new(format!("environment variable {name}"), problem));
    }
    // HashMap order is random; keep messages stable.
    out.problems.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Names the override variables a `config` crate error is about: those
/// whose key (`proxy.listen`) or whose section and field (`proxy`, `lisen`)
/// the message mentions; all of them if none match.
pub(crate) fn blame(keys: &HashMap<String, String>, message: &str) -> String {
    let mut vars: Vec<&str> = keys
        .iter()
        .filter(|(key, _)| {
            let (section, field) = key.split_once('.').unwrap_or((key.as_str(), ""));
            message.contains(&format!("`{key}`"))
                || (message.contains(&format!("`{section}`")) && message.contains(&format!("`{field}`")))
        })
        .map(|(_, var)| var.as_str())
        .collect();
    if vars.is_empty() {
        vars = keys.values().map(String::as_str).collect();
    }
    vars.sort_unstable();
    let plural = if vars.len() == 1 { "" } else { "s" };
    format!("environment variable{plural} {}", vars.join(", "))
}
