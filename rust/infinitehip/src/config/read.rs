//! Reading a `PolicyConfig` from JSON with errors a user can act on: the
//! JSON path of the bad field (`default.stages[0].chunk_size`, not the file
//! name) and the expected value in words (`a whole number >= 0`, not
//! `usize`). serde alone reports neither the path nor plain words; the path
//! comes from `serde_path_to_error`.

use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::Segment;

use super::{DenseFields, HipConfig, LazyConfig, LocretConfig, PolicyConfig, SqueezeConfig};
use crate::error::{Error, Result};

/// Parse (no validation). Syntax errors keep serde_json's line and column.
pub(super) fn parse(s: &str) -> Result<PolicyConfig> {
    let v: Value = serde_json::from_str(s)?;
    if !v.is_object() {
        return Err(Error::config(
            "(top level)",
            format!(
                "the config must be one JSON object such as {{\"default\": {{\"method\": \"hip\"}}}}, got {}",
                kind(&v)
            ),
        ));
    }
    match serde_path_to_error::deserialize::<_, PolicyConfig>(&v) {
        Ok(c) => {
            // serde also fills a struct from a list, by position
            // (`"model": [32, 8]`): a user never means that.
            let parsed = serde_json::to_value(&c).expect("config serialises");
            match list_for_object(&v, &parsed, &mut Vec::new()) {
                Some(path) => Err(Error::config(
                    render(&path),
                    "expected an object {...}, got a list [...]",
                )),
                None => Ok(c),
            }
        }
        Err(e) => {
            let path = segments(e.path());
            let msg = e.inner().to_string();
            // serde reads a policy's fields from a buffer behind its
            // `method` tag, so the path stops at the policy: read that
            // policy again on its own to name the field inside it.
            if let Some(deeper) = policy_error(&v, &path) {
                return Err(deeper);
            }
            Err(Error::config(render(&path), in_words(&msg)))
        }
    }
}

/// Path of the first place where the input holds a list and the parsed
/// config an object.
fn list_for_object(input: &Value, parsed: &Value, path: &mut Vec<String>) -> Option<Vec<String>> {
    match (input, parsed) {
        (Value::Array(_), Value::Object(_)) => Some(path.clone()),
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, x)| {
            path.push(k.clone());
            let r = b.get(k).and_then(|y| list_for_object(x, y, path));
            path.pop();
            r
        }),
        (Value::Array(a), Value::Array(b)) => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| {
                path.push(format!("[{i}]"));
                let r = list_for_object(x, y, path);
                path.pop();
                r
            })
        }
        _ => None,
    }
}

fn segments(p: &serde_path_to_error::Path) -> Vec<String> {
    p.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(format!("[{index}]")),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

fn render(path: &[String]) -> String {
    let mut out = String::new();
    for s in path {
        if !s.starts_with('[') && !out.is_empty() {
            out.push('.');
        }
        out.push_str(s);
    }
    if out.is_empty() {
        "(top level)".into()
    } else {
        out
    }
}

fn at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, s| match s.strip_prefix('[') {
        Some(i) => v.get(i.strip_suffix(']')?.parse::<usize>().ok()?),
        None => v.get(s.as_str()),
    })
}

/// The error inside the policy object at `path`, with its full path.
fn policy_error(root: &Value, path: &[String]) -> Option<Error> {
    let obj = at(root, path)?.as_object()?;
    let method = obj.get("method")?.as_str()?;
    let mut fields = obj.clone();
    fields.remove("method");
    let fields = Value::Object(fields);
    let inner = match method {
        "dense" => inner_error::<DenseFields>(&fields),
        "hip" => inner_error::<HipConfig>(&fields),
        "locret" => inner_error::<LocretConfig>(&fields),
        "lazy" => inner_error::<LazyConfig>(&fields),
        "squeeze" => inner_error::<SqueezeConfig>(&fields),
        _ => None,
    }?;
    let (sub, msg) = inner;
    let full: Vec<String> = path.iter().cloned().chain(sub).collect();
    let msg = match msg.split_once(", there are no fields") {
        Some((head, _)) if method == "dense" => format!("{head}: `dense` takes no settings"),
        _ => msg,
    };
    Some(Error::config(render(&full), in_words(&msg)))
}

fn inner_error<T: DeserializeOwned>(v: &Value) -> Option<(Vec<String>, String)> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(_) => None,
        Err(e) => Some((segments(e.path()), e.inner().to_string())),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list [...]",
        Value::Object(_) => "an object {...}",
    }
}

/// serde's `invalid type: integer `-5`, expected usize` in a user's words:
/// `expected a whole number >= 0, got -5`.
pub(super) fn in_words(msg: &str) -> String {
    let msg = msg.trim();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let Some((got, expected)) = rest.rsplit_once(", expected ") {
                return format!(
                    "expected {}, got {}",
                    expected_words(expected),
                    got_words(got)
                );
            }
        }
    }
    if msg == "missing field `method`" {
        return "missing field `method` (one of dense, hip, locret, lazy, squeeze)".into();
    }
    msg.to_string()
}

fn expected_words(e: &str) -> String {
    match e {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number >= 0".into(),
        "i64" | "i32" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" | "bool" => "true or false".into(),
        "a sequence" => "a list [...]".into(),
        "internally tagged enum LayerPolicyJson" => {
            "a policy object such as {\"method\": \"hip\"}".into()
        }
        _ if e.starts_with("struct ") => "an object {...}".into(),
        _ if e.starts_with("enum ") => "one of the names listed in the README".into(),
        _ => e.to_string(),
    }
}

fn got_words(g: &str) -> String {
    let unquote = |s: &str| s.trim_matches('`').to_string();
    for p in ["integer ", "floating point ", "boolean "] {
        if let Some(v) = g.strip_prefix(p) {
            return unquote(v);
        }
    }
    match g {
        "sequence" => "a list [...]".into(),
        "map" => "an object {...}".into(),
        "unit value" | "null" => "null".into(),
        _ => g.strip_prefix("string ").unwrap_or(g).to_string(),
    }
}
