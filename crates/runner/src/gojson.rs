//! JSON encoded the way Go's `encoding/json` encodes a `map[string]interface{}`,
//! so a cache entry tern writes is byte-identical to libcni's.
//!
//! - object keys sorted by byte order (Go sorts map keys),
//! - `<`, `>`, `&`, U+2028 and U+2029 escaped as `\u003c`, ... (Go's HTML-safe default),
//! - control characters as `\n`, `\r`, `\t`, `\b`, `\f` or `\u00XX`,
//! - numbers as Go prints a `float64`: integral values without a fraction,
//!   exponent form below 1e-6 and from 1e21 on.
//!
//! Pure.
use serde_json::Value;

/// `v` as Go would marshal it after unmarshalling it into an `interface{}`.
pub fn encode(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// A JSON string literal, Go-escaped.
pub fn encode_str(s: &str) -> String {
    let mut out = String::new();
    write_str(&mut out, s);
    out
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, k);
                out.push(':');
                write_value(out, &m[k.as_str()]);
            }
            out.push('}');
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_number(out: &mut String, n: &serde_json::Number) {
    if n.is_i64() || n.is_u64() {
        out.push_str(&n.to_string());
        return;
    }
    let f = n.as_f64().unwrap_or(0.0);
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        // Go: 'e' format, shortest mantissa, exponent with a sign and at least two digits.
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').expect("exponent form");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ("-", d),
            None => ("+", exp),
        };
        let digits = if digits.len() < 2 && sign == "+" { format!("0{digits}") } else { digits.to_string() };
        out.push_str(&format!("{mant}e{sign}{digits}"));
    } else if f.fract() == 0.0 {
        out.push_str(&format!("{f:.0}"));
    } else {
        out.push_str(&format!("{f}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_escapes_like_go() {
        let v = json!({"b": 1, "a": {"z": [true, null], "y": "<&>\u{2028}\n\u{1}"}});
        assert_eq!(encode(&v), r#"{"a":{"y":"\u003c\u0026\u003e\u2028\n\u0001","z":[true,null]},"b":1}"#);
    }

    #[test]
    fn numbers_as_go_float64() {
        let v: Value = serde_json::from_str("[1.0, 1.5, 0.0000001, 1e21, -3, 123456789.0]").unwrap();
        assert_eq!(encode(&v), "[1,1.5,1e-7,1e+21,-3,123456789]");
    }
}
