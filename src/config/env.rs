//! Environment layering: `TALLYD__SECTION__KEY=value` overrides the file's `[section] key`.
//! The environment is passed in as a map, never read here, so tests need no process-global
//! state.

use std::collections::HashMap;

use super::ConfigErrors;

const ENV_PREFIX: &str = "TALLYD__";

pub(super) fn apply_env_overrides(
    document: &mut toml::Table,
    env: &HashMap<String, String>,
) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut keys: Vec<&String> = env.keys().filter(|key| key.starts_with(ENV_PREFIX)).collect();
    keys.sort();
    for key in keys {
        let path: Vec<String> = key[ENV_PREFIX.len()..]
            .split("__")
            .map(|segment| segment.to_ascii_lowercase())
            .collect();
        if path.iter().any(|segment| segment.is_empty()) || path.len() < 2 {
            errors.push(format!("{key}: expected TALLYD__SECTION__KEY"));
            continue;
        }
        let raw_value = &env[key];
        // A value that parses as a TOML literal (number, bool, array) is used as such; else a string.
        let value = toml::from_str::<toml::Table>(&format!("v = {raw_value}"))
            .ok()
            .and_then(|mut table| table.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw_value.clone()));
        let (sections, leaf) = path.split_at(path.len() - 1);
        match section_table(document, sections) {
            Ok(table) => {
                table.insert(leaf[0].clone(), value);
            }
            Err(segment) => errors.push(format!("{key}: `{segment}` is not a section")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Walks (creating as needed) nested tables; `Err` names a segment that is not a table.
fn section_table<'a>(table: &'a mut toml::Table, sections: &[String]) -> Result<&'a mut toml::Table, String> {
    let Some((first, rest)) = sections.split_first() else {
        return Ok(table);
    };
    match table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(inner) => section_table(inner, rest),
        _ => Err(first.clone()),
    }
}
