//! Server text as it may be shown: Magento's message with its placeholders filled, a content
//! type, where a redirect points.
//!
//! Whatever an answer carries is server text: it may repeat the request, so the password (or
//! the token, for `customers/me`), in any encoding and in any piece ([`Pieces`]), and it may hold
//! control characters. It is shown only when it repeats no piece of the secret sent, at most
//! [`MAX_SHOWN`] characters of it, with its control characters escaped; and it never costs more
//! memory than that, whatever the answer asks for (Magento's placeholders are filled in one
//! bounded pass, [`fill_message`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;

use reqwest::header::HeaderValue;
use zeroize::Zeroizing;

use crate::logging::escape_controls;

/// The most characters of a server's message ever shown (more is cut, and marked `…`).
pub const MAX_SHOWN: usize = 500;

/// The most characters of a `Location`'s path, or of a content type, ever shown.
pub(crate) const MAX_SHOWN_SHORT: usize = 200;

/// Where a redirect points, as far as it can be shown: scheme, host and port, then the path if
/// it repeats nothing of the request; never a query or a fragment (`?…` says there was one).
/// A relative `Location` is read against the URL asked for.
pub(crate) fn redirect_target(location: Option<&HeaderValue>, asked: &reqwest::Url, pieces: &Pieces) -> String {
    let Some(value) = location else { return "(no Location)".to_owned() };
    // What matters is at its start; a longer value is only ever something to hide.
    let bytes = value.as_bytes();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(8 * 1024)]);
    let Ok(url) = asked.join(text.trim()) else { return "a Location that is not a URL".to_owned() };
    if !matches!(url.scheme(), "http" | "https") {
        return "a Location that is not an http(s) URL".to_owned();
    }
    let origin = url.origin().ascii_serialization();
    let Some(mut shown) = showable(&origin, false, MAX_SHOWN_SHORT, pieces) else {
        return "a Location that is not shown (it repeats part of the request)".to_owned();
    };
    if url.path() != "/" || url.query().is_some() {
        shown.push_str(&showable(url.path(), false, MAX_SHOWN_SHORT, pieces).unwrap_or_else(|| "/…".to_owned()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        shown.push_str("?…");
    }
    shown
}

/// Server text as it may be shown: at most `cap` characters (a cut is marked `…`), with its
/// control characters escaped; `None` when it repeats a piece of the secret. `cut` says the text
/// was already cut before: its end may then be the first characters of a secret that went on
/// (too few to be a piece), and they are dropped.
pub(crate) fn showable(text: &str, cut: bool, cap: usize, pieces: &Pieces) -> Option<String> {
    let mut kept = Zeroizing::new(String::new());
    let mut chars = text.chars();
    kept.extend(chars.by_ref().take(cap));
    let cut = cut || chars.next().is_some();
    if cut {
        // At most three characters of the secret (four are a piece), each at most 20 characters
        // of text once encoded (percent-encoded UTF-8, percent-encoded again); and an escape
        // cut short, whose first digits may be the secret's.
        for _ in 0..64 {
            if !(pieces.ends_in_start(&kept) || ends_in_escape(&kept)) {
                break;
            }
            kept.pop();
        }
    }
    if pieces.found_in(&kept) {
        return None;
    }
    let mut shown = escape_controls(&kept).into_owned();
    if cut {
        shown.push('…');
    }
    Some(shown)
}

/// Whether `text` ends inside an escape (`%4`, `\u00`, `&#x5`): what the decoders drop.
fn ends_in_escape(text: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let after = |c: char| text.rfind(c).map(|at| &text[at + 1..]);
    after('%').is_some_and(|a| a.len() < 2 && hex(a))
        || after('\\').is_some_and(|a| a.is_empty() || a.strip_prefix('u').is_some_and(|d| d.len() < 4 && hex(d)))
        || after('&').is_some_and(|a| a.len() < 10 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '#'))
}

/// Magento's error `message` with its `%placeholders` filled from `parameters` (an object for
/// named ones, an array for `%1`, `%2`, ...), at most [`MAX_SHOWN`] characters of it.
pub fn magento_message(body: &[u8]) -> Option<String> {
    fill_message(body).map(|f| f.text)
}

/// The start of Magento's message, filled.
pub(crate) struct Filled {
    pub(crate) text: String,
    /// The message went on beyond `text`.
    pub(crate) cut: bool,
    /// The start of Magento's message before its placeholders are filled: what it means, for
    /// [`classify`] (never shown).
    pub(crate) template_head: String,
}

pub(crate) fn fill_message(body: &[u8]) -> Option<Filled> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let template = value.get("message")?.as_str()?;
    Some(fill_text(template, value.get("parameters")))
}

/// A message with its `%placeholders` filled from `parameters`, at most [`MAX_SHOWN`] characters
/// of it: REST's `message` (through [`fill_message`]), or a GraphQL error's (which has none).
pub(crate) fn fill_text(template: &str, parameters: Option<&serde_json::Value>) -> Filled {
    let mut out = Bounded::new(MAX_SHOWN);
    fill(template, &Placeholders::new(parameters), &mut out);
    let template_head = template.chars().take(MAX_SHOWN_SHORT).collect();
    Filled { text: out.text, cut: out.cut, template_head }
}

/// Fills the placeholders of `template` into `out` in one pass, as Magento's renderer does
/// (PHP's `strtr`): at each `%`, the longest parameter name that follows is replaced by its
/// value, and a value is never scanned again (a value holding `%other` stays as it is). Stops as
/// soon as `out` is full, so an answer asking for gigabytes costs [`MAX_SHOWN`] characters.
fn fill(template: &str, params: &Placeholders, out: &mut Bounded) {
    let mut rest = template;
    // Empty values fill nothing: bounded by count too, so the scan is bounded whatever they are.
    let mut filled = 0;
    while let Some(at) = rest.find('%') {
        if !out.push(&rest[..at]) {
            return;
        }
        let after = &rest[at + 1..];
        match params.longest(after) {
            Some(_) if filled == MAX_SHOWN => {
                out.cut = true;
                return;
            }
            Some((len, value)) => {
                filled += 1;
                if !out.push_value(value) {
                    return;
                }
                rest = &after[len..];
            }
            None => {
                if !out.push("%") {
                    return;
                }
                rest = after;
            }
        }
    }
    out.push(rest);
}

/// The parameters of a Magento error, by placeholder name.
enum Placeholders<'a> {
    None,
    /// `%name`: the values by name, and the distinct name lengths, longest first.
    Named(HashMap<&'a str, &'a serde_json::Value>, Vec<usize>),
    /// `%1`, `%2`, ...
    Listed(&'a [serde_json::Value]),
}

impl<'a> Placeholders<'a> {
    fn new(parameters: Option<&'a serde_json::Value>) -> Placeholders<'a> {
        match parameters {
            Some(serde_json::Value::Object(map)) if !map.is_empty() => {
                let lengths: BTreeSet<usize> = map.keys().map(String::len).collect();
                Placeholders::Named(
                    map.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                    lengths.into_iter().rev().collect(),
                )
            }
            Some(serde_json::Value::Array(list)) if !list.is_empty() => Placeholders::Listed(list),
            _ => Placeholders::None,
        }
    }

    /// The longest placeholder name at the start of `after` (the text after a `%`): its length
    /// and its value.
    fn longest(&self, after: &str) -> Option<(usize, &'a serde_json::Value)> {
        match self {
            Placeholders::None => None,
            Placeholders::Named(values, lengths) => {
                lengths.iter().find_map(|&len| Some((len, *values.get(after.get(..len)?)?)))
            }
            Placeholders::Listed(list) => {
                let digits = after.bytes().take_while(u8::is_ascii_digit).count().min(20);
                (1..=digits).rev().find_map(|len| {
                    let name = &after[..len];
                    let n: usize = name.parse().ok().filter(|_| !name.starts_with('0'))?;
                    Some((len, list.get(n.checked_sub(1)?)?))
                })
            }
        }
    }
}

/// A string that takes at most `cap` characters, and remembers whether more was offered.
struct Bounded {
    text: String,
    chars: usize,
    cap: usize,
    cut: bool,
}

impl Bounded {
    fn new(cap: usize) -> Bounded {
        Bounded { text: String::new(), chars: 0, cap, cut: false }
    }

    /// Appends what fits; `false` once full.
    fn push(&mut self, s: &str) -> bool {
        for c in s.chars() {
            if self.chars == self.cap {
                self.cut = true;
                return false;
            }
            self.text.push(c);
            self.chars += 1;
        }
        true
    }

    /// A parameter's value: a string as it is, anything else as JSON, written only as far as
    /// it fits (a value of 60 KB costs what is left of the cap, not 60 KB).
    fn push_value(&mut self, value: &serde_json::Value) -> bool {
        if let Some(s) = value.as_str() {
            return self.push(s);
        }
        let room = (self.cap - self.chars) * 4 + 1;
        let mut json = Limited { bytes: Vec::new(), room };
        let complete = serde_json::to_writer(&mut json, value).is_ok();
        let text = match std::str::from_utf8(&json.bytes) {
            Ok(text) => text,
            Err(e) => std::str::from_utf8(&json.bytes[..e.valid_up_to()]).unwrap_or_default(),
        };
        if !self.push(text) {
            return false;
        }
        if !complete {
            self.cut = true;
        }
        complete
    }
}

/// A writer that takes `room` bytes, then fails (which stops a serializer).
struct Limited {
    bytes: Vec<u8>,
    room: usize,
}

impl std::io::Write for Limited {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let fits = data.len().min(self.room - self.bytes.len());
        self.bytes.extend_from_slice(&data[..fits]);
        if fits < data.len() {
            return Err(std::io::Error::other("full"));
        }
        Ok(fits)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every piece of a secret, to look for in server text: a server that reflects the request may
/// show it in part (a message cut, a parser's "near ..."), and encoded as it reflects input
/// (JSON string escapes, percent-encoding, HTML entities, base64).
///
/// A piece is any run of `min(4, len)` characters of the secret (so the whole of a shorter
/// one). Text is searched as received and decoded each of those ways (twice over: an escape
/// inside an encoding), so an occurrence in any of them is found. A text that was cut may also
/// end with the secret's first characters, fewer than a piece: [`Pieces::ends_in_start`].
pub(crate) struct Pieces {
    chars: Zeroizing<Vec<char>>,
    /// How many characters make a piece.
    width: usize,
    /// Hashes of every piece (the pieces themselves would be more copies of the secret).
    hashes: HashSet<u64>,
    hasher: std::collections::hash_map::RandomState,
    /// The base64 of the secret, as it reads at each of the three alignments and in both
    /// alphabets (the characters that do not depend on what surrounds it).
    base64: Vec<Zeroizing<String>>,
}

impl Pieces {
    pub(crate) fn of(secret: &str) -> Pieces {
        let chars = Zeroizing::new(secret.chars().collect::<Vec<char>>());
        let width = chars.len().min(4);
        let hasher = std::collections::hash_map::RandomState::new();
        let hashes =
            if width == 0 { HashSet::new() } else { chars.windows(width).map(|w| hasher.hash_one(w)).collect() };
        Pieces { base64: base64_forms(secret.as_bytes()), chars, width, hashes, hasher }
    }

    /// Whether `text`, as it is or decoded, holds a piece of the secret.
    pub(crate) fn found_in(&self, text: &str) -> bool {
        if self.width == 0 {
            return false;
        }
        decodings(text).iter().any(|candidate| {
            let chars = Zeroizing::new(candidate.chars().collect::<Vec<char>>());
            chars.windows(self.width).any(|w| {
                self.hashes.contains(&self.hasher.hash_one(w)) && self.chars.windows(self.width).any(|p| p == w)
            }) || self.base64.iter().any(|b| candidate.contains(b.as_str()))
        })
    }

    /// Whether `text`, as it is or decoded, ends with the secret's first characters (fewer than
    /// a piece; more would be a piece, found by [`Pieces::found_in`]).
    pub(crate) fn ends_in_start(&self, text: &str) -> bool {
        decodings(text).iter().any(|candidate| {
            let tail: Vec<char> = candidate.chars().rev().take(self.width).collect();
            (1..self.width.max(1)).any(|n| n <= tail.len() && tail[..n].iter().rev().eq(self.chars[..n].iter()))
        })
    }
}

/// The secret's base64 where it stands within longer base64 (a request body encoded whole):
/// for each alignment, the characters that depend on its bytes alone. Only when that leaves
/// at least 4 characters (shorter ones would be found everywhere; such secrets are short enough
/// for their pieces to be looked for).
fn base64_forms(secret: &[u8]) -> Vec<Zeroizing<String>> {
    use base64::Engine as _;
    let mut forms = Vec::new();
    for align in 0..3 {
        let mut bytes = Zeroizing::new(vec![0u8; align]);
        bytes.extend_from_slice(secret);
        let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD_NO_PAD.encode(&*bytes));
        let skip = [0, 2, 3][align];
        let end = if bytes.len() % 3 == 0 { encoded.len() } else { encoded.len().saturating_sub(1) };
        if end < skip + 4 {
            continue;
        }
        let standard = Zeroizing::new(encoded[skip..end].to_owned());
        let url_safe = Zeroizing::new(standard.replace('+', "-").replace('/', "_"));
        if *url_safe != *standard {
            forms.push(url_safe);
        }
        forms.push(standard);
    }
    forms
}

/// `text` as received, and decoded the ways a server reflects its input, twice over: JSON
/// string escapes, percent-encoding (with `+` as itself, and as a space), HTML entities, base64,
/// hexadecimal, and reversed.
fn decodings(text: &str) -> Vec<Zeroizing<String>> {
    let decoders: [fn(&str) -> String; 7] = [
        json_unescape,
        |s| percent_decode(s, false),
        |s| percent_decode(s, true),
        html_unescape,
        base64_decode,
        hex_decode,
        |s| s.chars().rev().collect(),
    ];
    let mut all = vec![Zeroizing::new(text.to_owned())];
    let mut start = 0;
    for _ in 0..2 {
        let end = all.len();
        for i in start..end {
            for decode in decoders {
                let decoded = Zeroizing::new(decode(&all[i]));
                if !all.iter().any(|seen| **seen == *decoded) {
                    all.push(decoded);
                }
            }
        }
        start = end;
    }
    all
}

/// JSON string escapes decoded (`\"`, `\\`, `\n`, `\u0022`, surrogate pairs); an escape cut
/// at the end is dropped, anything else left as it is.
fn json_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        let mut chars = escape.chars().skip(1);
        let Some(kind) = chars.next() else { return out };
        let simple = match kind {
            '"' | '\\' | '/' => Some(kind),
            'b' => Some('\u{8}'),
            'f' => Some('\u{c}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            rest = &escape[2..];
            continue;
        }
        if kind == 'u' {
            let hex = |s: &str| {
                (s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| u32::from_str_radix(s, 16).ok())
                    .flatten()
            };
            let digits: String = escape[2..].chars().take(4).collect();
            if let Some(unit) = hex(&digits) {
                rest = &escape[6..];
                if (0xd800..0xdc00).contains(&unit) {
                    if let Some(low) = rest.strip_prefix("\\u").and_then(|r| r.get(..4)).and_then(hex) {
                        if (0xdc00..0xe000).contains(&low) {
                            out.push(
                                char::from_u32(0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00))
                                    .unwrap_or('\u{fffd}'),
                            );
                            rest = &rest[6..];
                            continue;
                        }
                    }
                }
                out.push(char::from_u32(unit).unwrap_or('\u{fffd}'));
                continue;
            }
            if digits.len() < 4 && digits.bytes().all(|b| b.is_ascii_hexdigit()) && escape.len() == 2 + digits.len() {
                return out; // cut inside the escape
            }
        }
        out.push('\\');
        rest = &escape[1..];
    }
    out.push_str(rest);
    out
}

/// Percent-encoding decoded (and `+` as a space when `plus`); an escape cut at the end is
/// dropped, a `%` not followed by two hex digits left as it is.
fn percent_decode(text: &str, plus: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16);
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                (Some(_), None) if i + 2 == bytes.len() => break,
                (None, _) if i + 1 == bytes.len() => break,
                _ => out.push(b'%'),
            },
            b'+' if plus => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&out).into_owned();
    zeroize::Zeroize::zeroize(&mut out);
    decoded
}

/// Every run of at least 8 base64 characters (either alphabet) decoded, as read from its start
/// (a request body encoded whole); the rest left as it is.
fn base64_decode(text: &str) -> String {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let is_base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_base64) {
        out.push_str(&rest[..start]);
        let run = &rest[start..];
        let len = run.find(|c: char| !is_base64(c)).unwrap_or(run.len());
        let (run, after) = run.split_at(len);
        if len < 8 {
            out.push_str(run);
            rest = after;
            continue;
        }
        rest = after.trim_start_matches('=');
        let standard = Zeroizing::new(run[..len - len % 4].replace('-', "+").replace('_', "/"));
        match LENIENT.decode(standard.as_bytes()) {
            Ok(mut bytes) => {
                out.push_str(&String::from_utf8_lossy(&bytes));
                zeroize::Zeroize::zeroize(&mut bytes);
            }
            Err(_) => out.push_str(run),
        }
    }
    out.push_str(rest);
    out
}

/// Every run of at least 8 hexadecimal digits (either case; `\x` and `0x` before a pair are
/// dropped first) decoded, as read from its first digit and from its second; the rest left as
/// it is.
fn hex_decode(text: &str) -> String {
    let text = Zeroizing::new(text.replace("\\x", "").replace("0x", ""));
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find(|c: char| c.is_ascii_hexdigit()) {
        out.push_str(&rest[..start]);
        let run = &rest[start..];
        let len = run.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(run.len());
        let (run, after) = run.split_at(len);
        rest = after;
        if len < 8 {
            out.push_str(run);
            continue;
        }
        for from in [0, 1] {
            let digits = &run.as_bytes()[from..];
            let mut bytes = Zeroizing::new(Vec::with_capacity(digits.len() / 2));
            for pair in digits.chunks_exact(2) {
                let pair = std::str::from_utf8(pair).expect("hex digits are ASCII");
                bytes.push(u8::from_str_radix(pair, 16).expect("two hex digits"));
            }
            out.push_str(&String::from_utf8_lossy(&bytes));
            out.push(' ');
        }
    }
    out.push_str(rest);
    out
}

/// HTML character references decoded: the named ones servers use for input (`&quot;`, `&amp;`,
/// `&lt;`, `&gt;`, `&apos;`, `&nbsp;`) and numeric ones; one cut at the end is dropped.
fn html_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let reference = &rest[at + 1..];
        let name_end = reference.find(|c: char| !(c.is_ascii_alphanumeric() || c == '#')).unwrap_or(reference.len());
        let name = &reference[..name_end];
        if name_end == reference.len() && name.len() < 10 {
            return out; // cut inside the reference (or a bare `&` at the end)
        }
        let decoded = reference[name_end..].starts_with(';').then(|| match name {
            "quot" => Some('"'),
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => {
                let number = name.strip_prefix('#')?;
                let value = match number.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => number.parse().ok()?,
                };
                char::from_u32(value)
            }
        });
        match decoded.flatten() {
            Some(c) => {
                out.push(c);
                rest = &reference[name_end + 1..];
            }
            None => {
                out.push('&');
                rest = reference;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The fewest characters of a run that may be a token (an opaque token has 32; a JWT far more).
const TOKEN_LIKE: usize = 32;

/// `text` with every run that could be a token replaced by `<redacted>`: a run of at least
/// [`TOKEN_LIKE`] characters of the RFC 6750 token set (`[A-Za-z0-9._~+/-]`, `=` padding) with a
/// digit in it. For text the daemon shows but did not write, where it cannot know which token
/// may be in it (what a notify command prints: `curl -v`, `set -x`, `cat` of the token file). A
/// long path or identifier with a digit goes too; a token cut to fewer characters is no token.
pub fn without_tokens(text: &str) -> std::borrow::Cow<'_, str> {
    let in_set = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '+' | '/' | '-' | '=');
    let mut out = String::new();
    let mut kept = 0;
    let mut rest = text;
    let mut at = 0;
    while let Some(start) = rest.find(in_set) {
        let run_len = rest[start..].find(|c: char| !in_set(c)).unwrap_or(rest.len() - start);
        let run = &rest[start..start + run_len];
        if run.len() >= TOKEN_LIKE && run.bytes().any(|b| b.is_ascii_digit()) {
            out.push_str(&text[kept..at + start]);
            out.push_str("<redacted>");
            kept = at + start + run_len;
        }
        at += start + run_len;
        rest = &rest[start + run_len..];
    }
    if kept == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[kept..]);
    std::borrow::Cow::Owned(out)
}

/// Where JSON from elsewhere (an API's answer, a record others may edit) stopped parsing: never
/// its text, nor a value in it (serde's own message may quote one).
#[derive(Debug)]
pub struct Malformed {
    what: &'static str,
    line: usize,
    column: usize,
}

impl Malformed {
    pub fn new(e: &serde_json::Error) -> Malformed {
        let what = match e.classify() {
            serde_json::error::Category::Io => "a read error",
            serde_json::error::Category::Syntax => "a syntax error",
            serde_json::error::Category::Data => "a value of the wrong type or form",
            serde_json::error::Category::Eof => "an early end",
        };
        Malformed { what, line: e.line(), column: e.column() }
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at line {}, column {}", self.what, self.line, self.column)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn runs_that_could_be_tokens_are_redacted_and_the_rest_kept() {
        let jwt = "eyJraWQiOiIxIiwiYWxnIjoiSFMyNTYifQ.eyJ1aWQiOjMsInV0eXBpZCI6M30.c2lnbmF0dXJl-_x";
        let opaque = "0123456789abcdefghijklmnopqrstuv";
        assert_eq!(
            without_tokens(&format!("> Authorization: Bearer {jwt}\ncat: {opaque} done")),
            "> Authorization: Bearer <redacted>\ncat: <redacted> done"
        );
        let plain = "reloaded /var/run/app (pid 42) in 3 ms; see https://example.com/docs";
        assert!(matches!(without_tokens(plain), std::borrow::Cow::Borrowed(_)), "nothing to redact");
        assert_eq!(without_tokens(""), "");
        assert_eq!(without_tokens(opaque), "<redacted>");
        assert_eq!(without_tokens("é"), "é");
    }

    /// A password with what JSON escapes: quotes and a backslash.
    pub(crate) const PW: &str = r#"Sekr3t"Q\uote-PW9"#;

    #[test]
    fn magento_messages_get_their_placeholders_filled() {
        let body =
            br#"{"message":"\"%fieldName\" is required. Enter and try again.","parameters":{"fieldName":"password"}}"#;
        assert_eq!(magento_message(body).unwrap(), "\"password\" is required. Enter and try again.");
        let body =
            br#"{"message":"The consumer isn't authorized to access %resources.","parameters":{"resources":"self"}}"#;
        assert_eq!(magento_message(body).unwrap(), "The consumer isn't authorized to access self.");
        let body = br#"{"message":"No such entity with %1 = %2","parameters":["email","x"]}"#;
        assert_eq!(magento_message(body).unwrap(), "No such entity with email = x");
        assert_eq!(magento_message(b"<html>"), None);
        assert_eq!(magento_message(br#"{"trace":"..."}"#), None);
    }

    fn filled(body: &serde_json::Value) -> Filled {
        fill_message(&serde_json::to_vec(body).unwrap()).unwrap()
    }

    #[test]
    fn placeholders_are_filled_in_one_bounded_pass() {
        use serde_json::json;
        // Longest name first, as Magento's strtr: `%names` is not `%name` + "s".
        let f =
            filled(&json!({"message": "%name, %names, %namesake, %nam", "parameters": {"name": "N", "names": "NS"}}));
        assert_eq!((f.text.as_str(), f.cut), ("N, NS, NSake, %nam", false));
        // A value is never scanned again: no chaining.
        let f = filled(&json!({"message": "%a|%b", "parameters": {"a": "%b%b", "b": "B"}}));
        assert_eq!(f.text, "%b%b|B");
        // Arrays: %1..%n, the longest number that names one (%10 with ten values, %1 then "1"
        // with fewer), never %0.
        let ten: Vec<String> = (1..=10).map(|i| format!("v{i}")).collect();
        let f = filled(&json!({"message": "%1 %2 %10 %11 %0 %", "parameters": ten}));
        assert_eq!(f.text, "v1 v2 v10 v11 %0 %");
        let f = filled(&json!({"message": "%1 %10", "parameters": ["one"]}));
        assert_eq!(f.text, "one one0");
        // Values that are not strings are shown as JSON.
        let f = filled(&json!({"message": "%1, %2, %3", "parameters": [7, null, {"k": [1]}]}));
        assert_eq!(f.text, r#"7, null, {"k":[1]}"#);
        // Unknown names and stray signs stay as they are.
        let f = filled(&json!({"message": "100% %x %%a", "parameters": {"a": "A"}}));
        assert_eq!(f.text, "100% %x %A");

        // What would be gigabytes is MAX_SHOWN characters, marked as cut.
        let wide = filled(&json!({"message": "%a".repeat(16_000), "parameters": {"a": "x".repeat(30_000)}}));
        assert_eq!((wide.text.chars().count(), wide.cut), (MAX_SHOWN, true));
        let chained = filled(
            &json!({"message": "%a".repeat(16_000), "parameters": {"a": "%b".repeat(8_000), "b": "y".repeat(30_000)}}),
        );
        assert_eq!(chained.text, "%b".repeat(MAX_SHOWN / 2));
        let object = filled(&json!({"message": "%1", "parameters": [{"k": "é".repeat(40_000)}]}));
        assert_eq!((object.text.chars().count(), object.cut), (MAX_SHOWN, true));
        assert!(object.text.starts_with(r#"{"k":"éé"#));
        let multibyte = filled(&json!({"message": "✓".repeat(600)}));
        assert_eq!((multibyte.text.chars().count(), multibyte.cut), (MAX_SHOWN, true));
        // Empty values fill nothing: the scan still stops.
        let empty = filled(&json!({"message": "%a".repeat(16_000), "parameters": {"a": ""}}));
        assert_eq!((empty.text.as_str(), empty.cut), ("", true));
        // Exactly the cap is not a cut.
        let exact = filled(&json!({"message": "z".repeat(MAX_SHOWN)}));
        assert!(!exact.cut);
    }

    fn json_escaped(s: &str) -> String {
        let quoted = serde_json::to_string(s).unwrap();
        quoted[1..quoted.len() - 1].to_owned()
    }

    #[test]
    fn pieces_of_a_secret_are_found_in_every_encoding() {
        use base64::Engine as _;
        let pieces = Pieces::of(PW);
        let body = serde_json::to_string(&serde_json::json!({"username": "u@example.com", "password": PW})).unwrap();
        let unicode: String = PW
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("\\u{:04X}", c as u32) })
            .collect();
        let percent: String = PW.bytes().map(|b| format!("%{b:02x}")).collect();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let url_b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for text in [
            PW.to_owned(),
            format!("Cannot process {body}"),
            json_escaped(&body),
            format!("near \"{unicode}\""),
            format!("/login?p={percent}&next=/"),
            format!("p={}", percent.replace("%2d", "+")),
            PW.replace('"', "&quot;").replace('\\', "&#x5C;"),
            PW.replace('"', "&#34;").replace('\\', "&bsol;"),
            format!("body: {}", b64(&body)),
            format!("x{}", url_b64(&format!("ab{PW}"))),
            format!("{}...", &b64(&format!("{PW}{PW}"))[4..]),
            // Hexadecimal, either case, from either digit, with or without `\x`; reversed.
            format!("bytes: {}", PW.bytes().map(|b| format!("{b:02x}")).collect::<String>()),
            format!("BYTES={}", PW.bytes().map(|b| format!("{b:02X}")).collect::<String>()),
            format!("x{}", PW.bytes().map(|b| format!("{b:02x}")).collect::<String>()),
            format!("a{}", PW.bytes().map(|b| format!("{b:02x}")).collect::<String>()),
            PW.bytes().map(|b| format!("\\x{b:02x}")).collect(),
            format!("reversed: {}", PW.chars().rev().collect::<String>()),
            b64(&PW.chars().rev().collect::<String>()),
            // Twice over: JSON escapes, percent-encoded.
            json_escaped(PW).bytes().map(|b| format!("%{b:02X}")).collect(),
            // Pieces: 4 characters of it anywhere, as they are or decoded.
            "parse error near 3t\"Q".to_owned(),
            "parse error near 3t\\\"Q".to_owned(),
            "ends with -PW9".to_owned(),
        ] {
            assert!(pieces.found_in(&text), "not found in {text:?}");
        }
        for text in [
            "The account sign-in was incorrect or your account is disabled temporarily.",
            "Internal Error. Details are available in Magento log file. Report ID: webapi-0123456789abc",
            "only 3 of it: Sek, PW9, \"Q\\",
            "",
        ] {
            assert!(!pieces.found_in(text), "found in {text:?}");
        }
        // A secret shorter than a piece: the whole of it.
        assert!(Pieces::of("ab").found_in("about"));
        assert!(!Pieces::of("ab").found_in("a b"));
        assert!(!Pieces::of("").found_in("anything"));
        // The end of a cut text: the secret's first characters, as they are or encoded.
        for (text, ends) in [
            ("xxxS", true),
            ("xxxSek", true),
            ("xxx%53%65", true),
            ("xxx%53%6", true),
            ("xxx\\u0053\\u00", true),
            ("xxx", false),
            ("xxxSex", false),
        ] {
            assert_eq!(pieces.ends_in_start(text), ends, "{text:?}");
        }
    }

    /// A secret with no 4 characters in a row that survive any encoding as they are: only
    /// decoding finds it.
    #[test]
    fn only_decoding_finds_a_secret_made_of_what_encodings_change() {
        use base64::Engine as _;
        const SPECIAL: &str = "\"a<b>c&d\"e<f>g&\u{e9} h";
        let pieces = Pieces::of(SPECIAL);
        let percent: String = SPECIAL.bytes().map(|b| format!("%{b:02X}")).collect();
        let form: String = SPECIAL
            .bytes()
            .map(|b| {
                if b == b' ' {
                    "+".to_owned()
                } else if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02x}")
                }
            })
            .collect();
        let html = SPECIAL.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;");
        let numeric: String = SPECIAL.chars().map(|c| format!("&#{};", c as u32)).collect();
        let unicode: String = SPECIAL.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
        let body = serde_json::to_string(&serde_json::json!({"password": SPECIAL})).unwrap();
        // JSON leaves most of it as it is; the others change every piece.
        for text in [json_escaped(SPECIAL), json_escaped(&json_escaped(SPECIAL))] {
            assert!(pieces.found_in(&text), "not found in {text:?}");
        }
        let encodings = [
            unicode.clone(),
            percent.clone(),
            form,
            html,
            numeric,
            base64::engine::general_purpose::STANDARD.encode(&body),
            base64::engine::general_purpose::URL_SAFE.encode(SPECIAL),
            json_escaped(&unicode),
            percent.replace('%', "%25"),
        ];
        for text in &encodings {
            assert!(pieces.found_in(&format!("error: {text} (end)")), "not found in {text:?}");
            // Not as they are: what was found was found by decoding.
            let plain: Vec<char> = text.chars().collect();
            assert!(!plain.windows(4).any(|w| SPECIAL.contains(&w.iter().collect::<String>())), "{text:?}");
        }
        // Another secret is found in none of them.
        let other = Pieces::of("n0t-the-Same!");
        assert!(!encodings.iter().any(|text| other.found_in(text)));
    }

    #[test]
    fn server_text_is_shown_only_when_it_repeats_nothing() {
        let pieces = Pieces::of(PW);
        // Too short to be found anywhere else: 3 characters of the password where the text is
        // cut are dropped; 8 make the whole text unshowable.
        for keep in 1..=3 {
            let text = format!("{}{}", "x".repeat(MAX_SHOWN - keep), PW);
            assert_eq!(
                showable(&text, false, MAX_SHOWN, &pieces).unwrap(),
                format!("{}…", "x".repeat(MAX_SHOWN - keep))
            );
        }
        let text = format!("{}{}", "x".repeat(492), PW);
        assert_eq!(showable(&text, false, MAX_SHOWN, &pieces), None);
        let encoded = format!("{}%53%65%6B", "x".repeat(480));
        assert_eq!(showable(&encoded, true, MAX_SHOWN, &pieces).unwrap(), format!("{}…", "x".repeat(480)));
        assert_eq!(
            showable(&format!("{}\\u0053\\u0", "x".repeat(480)), true, MAX_SHOWN, &pieces).unwrap(),
            format!("{}…", "x".repeat(480))
        );
        assert_eq!(
            showable(&format!("{}&#x5", "x".repeat(480)), true, MAX_SHOWN, &pieces).unwrap(),
            format!("{}…", "x".repeat(480))
        );
        // Not cut: no trimming of an innocent end.
        assert_eq!(showable("Sorry S", false, MAX_SHOWN, &pieces).unwrap(), "Sorry S");
        assert_eq!(showable("100%", false, MAX_SHOWN, &pieces).unwrap(), "100%");
        // Control characters are escaped.
        assert_eq!(showable("a\nb\x1b[1m\0", false, MAX_SHOWN, &pieces).unwrap(), "a\\nb\\u{1b}[1m\\0");
    }

    #[test]
    fn redirects_show_where_they_point_and_nothing_they_carry() {
        let pieces = Pieces::of(PW);
        let asked = reqwest::Url::parse("http://127.0.0.1:8080/rest/V1/integration/customer/token").unwrap();
        let target = |location: Option<&str>| {
            let value = location.map(|l| HeaderValue::from_str(l).unwrap());
            redirect_target(value.as_ref(), &asked, &pieces)
        };
        assert_eq!(target(Some("https://shop.example.com/rest/V1/x")), "https://shop.example.com/rest/V1/x");
        assert_eq!(target(Some("https://shop.example.com:8443/")), "https://shop.example.com:8443");
        assert_eq!(target(Some("/shop/rest/V1/x?a=1")), "http://127.0.0.1:8080/shop/rest/V1/x?…");
        assert_eq!(
            target(Some("https://sso.example.net/login?password=Sekr3t%22Q%5Cuote-PW9")),
            "https://sso.example.net/login?…"
        );
        assert_eq!(target(Some("https://sso.example.net/p/Sekr3t%22Q%5Cuote-PW9")), "https://sso.example.net/…");
        assert_eq!(target(Some("https://user:Sekr3t@sso.example.net/#frag")), "https://sso.example.net?…");
        assert_eq!(
            target(Some("https://sekr3t-q.example.net/")),
            "a Location that is not shown (it repeats part of the request)"
        );
        assert_eq!(target(Some("javascript:alert(1)")), "a Location that is not an http(s) URL");
        assert_eq!(target(None), "(no Location)");
        let long = format!("https://shop.example.com/{}", "a/".repeat(5_000));
        assert!(target(Some(&long)).ends_with("/a/a…"), "{}", target(Some(&long)));
    }
}
