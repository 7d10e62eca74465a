//! How Magento's REST layer reads request bodies and writes answers.
//!
//! - Answers are JSON or XML depending on `Accept` (Magento's RendererFactory), JSON as
//!   PHP's `json_encode` writes it (`/` as `\/`, non-ASCII as `\uXXXX`, keys in insertion
//!   order), XML wrapped in a `<response>` root.
//! - Request bodies are read according to `Content-Type` (Magento's Rest\Request and
//!   DeserializerFactory), with the same error messages.

use std::fmt::Write as _;

/// An answer's data, keeping key order as PHP arrays do (serde_json's map would sort).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    List(Vec<Node>),
    Map(Vec<(&'static str, Node)>),
    /// A map whose keys come from the request (GraphQL response keys are the client's aliases).
    Obj(Vec<(String, Node)>),
}

impl Node {
    pub(crate) fn str(s: impl Into<String>) -> Node {
        Node::Str(s.into())
    }

    pub(crate) fn to_json(&self) -> String {
        let mut out = String::with_capacity(128);
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        match self {
            Node::Null => out.push_str("null"),
            Node::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Node::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Node::Str(s) => php_json_string(s, out),
            Node::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            Node::Map(fields) => write_json_map(fields.iter().map(|(k, v)| (*k, v)), out),
            Node::Obj(fields) => write_json_map(fields.iter().map(|(k, v)| (k.as_str(), v)), out),
        }
    }

    /// Magento's XML renderer: everything inside one `<response>` element, list items
    /// as `<item>`, booleans as `true`/`false`.
    pub(crate) fn to_xml(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("<?xml version=\"1.0\"?>\n<response>");
        self.write_xml(&mut out);
        out.push_str("</response>\n");
        out
    }

    fn write_xml(&self, out: &mut String) {
        match self {
            Node::Null => {}
            Node::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Node::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Node::Str(s) => xml_escape(s, out),
            Node::List(items) => {
                for item in items {
                    out.push_str("<item>");
                    item.write_xml(out);
                    out.push_str("</item>");
                }
            }
            Node::Map(fields) => {
                for (k, v) in fields {
                    let _ = write!(out, "<{k}>");
                    v.write_xml(out);
                    let _ = write!(out, "</{k}>");
                }
            }
            Node::Obj(fields) => {
                for (k, v) in fields {
                    let _ = write!(out, "<{k}>");
                    v.write_xml(out);
                    let _ = write!(out, "</{k}>");
                }
            }
        }
    }
}

fn write_json_map<'a>(fields: impl Iterator<Item = (&'a str, &'a Node)>, out: &mut String) {
    out.push('{');
    for (i, (k, v)) in fields.enumerate() {
        if i > 0 {
            out.push(',');
        }
        php_json_string(k, out);
        out.push(':');
        v.write_json(out);
    }
    out.push('}');
}

/// A JSON string literal the way PHP's `json_encode` writes it with default flags.
pub(crate) fn php_json_string(s: &str, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x80 => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn xml_escape(s: &str, out: &mut String) {
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

/// The answer format Magento picks from `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Xml,
}

impl Format {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json; charset=utf-8",
            Format::Xml => "application/xml; charset=utf-8",
        }
    }

    pub(crate) fn render(self, node: &Node) -> String {
        match self {
            Format::Json => node.to_json(),
            Format::Xml => node.to_xml(),
        }
    }
}

/// Magento's renderers, in the order its di.xml declares them.
const RENDERERS: [(&str, Format); 5] = [
    ("*/*", Format::Json),
    ("application/json", Format::Json),
    ("text/xml", Format::Xml),
    ("application/xml", Format::Xml),
    ("application/xhtml+xml", Format::Xml),
];

/// Picks the renderer as Magento does: accepted types by falling quality, each tried
/// against every renderer (exact type, `major/*`, or `*/*`). `Err` carries the first
/// accepted type, which Magento names in its 406 message.
pub(crate) fn negotiate(accept: Option<&str>) -> Result<Format, String> {
    let header = accept.unwrap_or("");
    // Fast path for what well-behaved clients send.
    match header {
        "" | "application/json" | "*/*" => return Ok(Format::Json),
        _ => {}
    }
    let types = accept_types(header);
    if types.is_empty() {
        return Ok(Format::Json);
    }
    for t in &types {
        for (rtype, format) in RENDERERS {
            let major = rtype.split('/').next().unwrap_or("");
            if *t == rtype || *t == "*/*" || (t.len() == major.len() + 2 && t.starts_with(major) && t.ends_with("/*")) {
                return Ok(format);
            }
        }
    }
    Err(types[0].to_owned())
}

/// Magento's Rest\Request::getAcceptTypes: split at commas, drop malformed media types,
/// order by the first parameter's value (taken as quality), keeping first occurrences.
fn accept_types(header: &str) -> Vec<&str> {
    let mut found: Vec<(f64, usize, &str)> = Vec::new();
    for (index, definition) in header.split(',').enumerate() {
        let mut pieces = definition.split(';');
        let mime = pieces.next().unwrap_or("").trim();
        if !valid_accept_mime(mime) {
            continue;
        }
        let quality = pieces
            .next()
            .and_then(|p| {
                let kv: Vec<&str> = p.split('=').collect();
                (kv.len() == 2).then(|| kv[1].trim().parse::<f64>().unwrap_or(0.0))
            })
            .unwrap_or(1.0);
        if found.iter().any(|(_, _, m)| *m == mime) {
            // Keep the highest quality for a repeated type.
            if let Some(entry) = found.iter_mut().find(|(_, _, m)| *m == mime) {
                if quality > entry.0 {
                    entry.0 = quality;
                }
            }
            continue;
        }
        found.push((quality, index, mime));
    }
    found.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
    found.into_iter().map(|(_, _, m)| m).collect()
}

/// `~^([0-9a-z*+\-]+)(?:/([0-9a-z*+\-\.]+))?$~i`
fn valid_accept_mime(mime: &str) -> bool {
    let ok = |c: char, dot: bool| c.is_ascii_alphanumeric() || c == '*' || c == '+' || c == '-' || (dot && c == '.');
    let (major, minor) = match mime.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (mime, None),
    };
    !major.is_empty()
        && major.chars().all(|c| ok(c, false))
        && minor.is_none_or(|m| !m.is_empty() && m.chars().all(|c| ok(c, true)))
}

/// How a request body is to be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Json,
    Xml,
}

/// Magento's Rest\Request::getContentType plus DeserializerFactory::get; `Err` is the
/// message of the 400 answer.
pub(crate) fn body_kind(content_type: Option<&str>) -> Result<BodyKind, String> {
    let value = content_type.unwrap_or("");
    if value.is_empty() {
        return Err("Content-Type header is empty.".to_owned());
    }
    // ~^([a-z\d/\-+.]+)(?:; *charset=(.+))?$~Ui
    let (media, params) = match value.split_once(';') {
        Some((m, p)) => (m, Some(p)),
        None => (value, None),
    };
    let media_ok =
        !media.is_empty() && media.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '+' | '.'));
    let charset = match params {
        None => None,
        Some(p) => {
            let p = p.trim_start_matches(' ');
            match p.get(..8) {
                Some(prefix) if prefix.eq_ignore_ascii_case("charset=") && p.len() > 8 => Some(&p[8..]),
                _ => return Err("Content-Type header is invalid.".to_owned()),
            }
        }
    };
    if !media_ok {
        return Err("Content-Type header is invalid.".to_owned());
    }
    if let Some(cs) = charset {
        if !cs.eq_ignore_ascii_case("utf-8") {
            return Err("UTF-8 is the only supported charset.".to_owned());
        }
    }
    // The deserializers are looked up by exact (case-sensitive) media type.
    match media {
        "application/json" => Ok(BodyKind::Json),
        "application/xml" | "application/xhtml+xml" | "text/xml" => Ok(BodyKind::Xml),
        other => Err(format!("Server cannot understand Content-Type HTTP header media type {other}")),
    }
}

/// Reads an XML request body into the map of its root element's children, the way
/// Magento's XML deserializer turns `<request><username>..</username></request>` into
/// parameters. Elements with children become objects, the others strings. Only the
/// subset of XML such bodies need; anything else (DTDs included) is a decoding error.
pub(crate) fn parse_xml_body(body: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut p = XmlParser { s: text, pos: 0 };
    p.skip_misc()?;
    let (_, root) = p.element(0)?;
    p.skip_misc()?;
    if p.pos != p.s.len() {
        return None;
    }
    match root {
        serde_json::Value::Object(m) => Some(m),
        _ => Some(serde_json::Map::new()),
    }
}

struct XmlParser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> XmlParser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_until(&mut self, end: &str) -> Option<()> {
        let at = self.rest().find(end)?;
        self.pos += at + end.len();
        Some(())
    }

    /// Whitespace, comments and processing instructions (the XML declaration).
    fn skip_misc(&mut self) -> Option<()> {
        loop {
            let trimmed = self.rest().trim_start();
            self.pos = self.s.len() - trimmed.len();
            if trimmed.starts_with("<?") {
                self.skip_until("?>")?;
            } else if trimmed.starts_with("<!--") {
                self.skip_until("-->")?;
            } else {
                return Some(());
            }
        }
    }

    fn name(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let len =
            rest.find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | ':' | '.' | '-'))).unwrap_or(rest.len());
        if len == 0 {
            return None;
        }
        let start = self.pos;
        self.pos += len;
        Some(&self.s[start..start + len])
    }

    fn element(&mut self, depth: usize) -> Option<(String, serde_json::Value)> {
        if depth > 64 || !self.rest().starts_with('<') {
            return None;
        }
        self.pos += 1;
        let name = self.name()?.to_owned();
        // Attributes are ignored, but quoted values may hide '>' characters.
        loop {
            let rest = self.rest();
            let c = rest.chars().next()?;
            match c {
                '"' | '\'' => {
                    self.pos += 1;
                    let end = self.rest().find(c)?;
                    self.pos += end + 1;
                }
                '/' if rest.starts_with("/>") => {
                    self.pos += 2;
                    return Some((name, serde_json::Value::String(String::new())));
                }
                '>' => {
                    self.pos += 1;
                    break;
                }
                '<' => return None,
                _ => self.pos += c.len_utf8(),
            }
        }
        let mut text = String::new();
        let mut children = serde_json::Map::new();
        loop {
            let rest = self.rest();
            if rest.starts_with("</") {
                self.pos += 2;
                if self.name()? != name {
                    return None;
                }
                let trimmed = self.rest().trim_start();
                self.pos = self.s.len() - trimmed.len();
                if !trimmed.starts_with('>') {
                    return None;
                }
                self.pos += 1;
                break;
            } else if rest.starts_with("<!--") {
                self.skip_until("-->")?;
            } else if let Some(cdata) = rest.strip_prefix("<![CDATA[") {
                let end = cdata.find("]]>")?;
                text.push_str(&cdata[..end]);
                self.pos += 9 + end + 3;
            } else if rest.starts_with("<?") {
                self.skip_until("?>")?;
            } else if rest.starts_with('<') {
                let (child, value) = self.element(depth + 1)?;
                children.insert(child, value);
            } else if rest.is_empty() {
                return None;
            } else {
                let end = rest.find('<').unwrap_or(rest.len());
                decode_entities(&rest[..end], &mut text)?;
                self.pos += end;
            }
        }
        if children.is_empty() {
            Some((name, serde_json::Value::String(text)))
        } else {
            Some((name, serde_json::Value::Object(children)))
        }
    }
}

fn decode_entities(raw: &str, out: &mut String) -> Option<()> {
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after.find(';')?;
        let entity = &after[..semi];
        let ch = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity.strip_prefix("#x").or_else(|| entity.strip_prefix("#X")) {
                    u32::from_str_radix(hex, 16).ok()?
                } else {
                    entity.strip_prefix('#')?.parse::<u32>().ok()?
                };
                char::from_u32(code)?
            }
        };
        out.push(ch);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn php_style_json() {
        let n = Node::Map(vec![
            ("message", Node::str("a/b \"é\" 😀\n")),
            ("ok", Node::Bool(true)),
            ("list", Node::List(vec![Node::Int(-1)])),
            ("data", Node::Obj(vec![("z".to_owned(), Node::Null), ("a".to_owned(), Node::Int(1))])),
        ]);
        assert_eq!(
            n.to_json(),
            r#"{"message":"a\/b \"\u00e9\" \ud83d\ude00\n","ok":true,"list":[-1],"data":{"z":null,"a":1}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&n.to_json()).unwrap();
        assert_eq!(v["message"], "a/b \"é\" 😀\n");
    }

    #[test]
    fn xml_rendering() {
        assert_eq!(Node::str("tok").to_xml(), "<?xml version=\"1.0\"?>\n<response>tok</response>\n");
        let n = Node::Map(vec![("message", Node::str("a<b&c")), ("errors", Node::List(vec![Node::Bool(false)]))]);
        assert_eq!(
            n.to_xml(),
            "<?xml version=\"1.0\"?>\n<response><message>a&lt;b&amp;c</message><errors><item>false</item></errors></response>\n"
        );
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(negotiate(None), Ok(Format::Json));
        assert_eq!(negotiate(Some("*/*")), Ok(Format::Json));
        assert_eq!(negotiate(Some("application/json")), Ok(Format::Json));
        assert_eq!(negotiate(Some("application/xml")), Ok(Format::Xml));
        assert_eq!(negotiate(Some("text/xml")), Ok(Format::Xml));
        assert_eq!(negotiate(Some("text/*")), Ok(Format::Xml));
        assert_eq!(negotiate(Some("application/*")), Ok(Format::Json));
        assert_eq!(negotiate(Some("application/xml;q=0.5, application/json")), Ok(Format::Json));
        assert_eq!(negotiate(Some("application/xml, application/json")), Ok(Format::Xml));
        assert_eq!(negotiate(Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")), Ok(Format::Xml));
        assert_eq!(negotiate(Some("text/html")), Err("text/html".to_owned()));
        assert_eq!(negotiate(Some("not a type")), Ok(Format::Json));
    }

    #[test]
    fn content_types() {
        assert_eq!(body_kind(Some("application/json")), Ok(BodyKind::Json));
        assert_eq!(body_kind(Some("application/json; charset=utf-8")), Ok(BodyKind::Json));
        assert_eq!(body_kind(Some("application/json;charset=UTF-8")), Ok(BodyKind::Json));
        assert_eq!(body_kind(Some("text/xml")), Ok(BodyKind::Xml));
        assert_eq!(body_kind(None).unwrap_err(), "Content-Type header is empty.");
        assert_eq!(body_kind(Some("")).unwrap_err(), "Content-Type header is empty.");
        assert_eq!(
            body_kind(Some("text/plain")).unwrap_err(),
            "Server cannot understand Content-Type HTTP header media type text/plain"
        );
        assert_eq!(
            body_kind(Some("Application/JSON")).unwrap_err(),
            "Server cannot understand Content-Type HTTP header media type Application/JSON"
        );
        assert_eq!(
            body_kind(Some("application/json; charset=latin1")).unwrap_err(),
            "UTF-8 is the only supported charset."
        );
        assert_eq!(body_kind(Some("application/json; boundary=x")).unwrap_err(), "Content-Type header is invalid.");
        assert_eq!(body_kind(Some("application json")).unwrap_err(), "Content-Type header is invalid.");
    }

    #[test]
    fn xml_bodies() {
        let m = parse_xml_body(
            b"<?xml version=\"1.0\"?>\n<request a=\"x>y\"><username>a&amp;b@example.com</username><password><![CDATA[p<w]]></password><x><y>1</y></x><e/></request>\n",
        )
        .unwrap();
        assert_eq!(m["username"], "a&b@example.com");
        assert_eq!(m["password"], "p<w");
        assert!(m["x"].is_object());
        assert_eq!(m["e"], "");
        assert!(parse_xml_body(b"<a><b></a>").is_none());
        assert!(parse_xml_body(b"{\"username\":1}").is_none());
        assert!(parse_xml_body(b"<a></a><b></b>").is_none());
        assert!(parse_xml_body(b"<!DOCTYPE a><a/>").is_none());
        assert!(parse_xml_body(b"<a>&bogus;</a>").is_none());
    }
}
