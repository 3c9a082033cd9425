//! Content-Encoding: which codings the guard can see through, and bounded decoding.

use std::io::Read;

/// A content coding the guard decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// HTTP `deflate` is zlib-wrapped (RFC 9110); a raw deflate stream is accepted too.
    Deflate,
}

impl Coding {
    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// Most codings stacked on one body (`Content-Encoding: gzip, gzip, gzip`).
pub const MAX_CODINGS: usize = 3;

/// Parses `Content-Encoding` values (in order of application). `Err(coding)` names the first
/// coding the guard cannot decode (unknown codings, or too many stacked).
pub fn parse_codings<'a>(values: impl Iterator<Item = &'a str>) -> Result<Vec<Coding>, String> {
    let mut codings = Vec::new();
    for value in values {
        for item in value.split(',') {
            let item = item.trim().to_ascii_lowercase();
            let coding = match item.as_str() {
                "" | "identity" => continue,
                "gzip" | "x-gzip" => Coding::Gzip,
                "deflate" => Coding::Deflate,
                _ => return Err(item.chars().filter(|c| c.is_ascii_graphic()).take(32).collect()),
            };
            if codings.len() == MAX_CODINGS {
                return Err(format!("more than {MAX_CODINGS} stacked codings"));
            }
            codings.push(coding);
        }
    }
    Ok(codings)
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The decoded body would exceed the limit (a zip bomb, or just large).
    TooLarge,
    /// Not valid data for the declared coding.
    Invalid(Coding),
}

/// Undoes `codings` (applied in order, so undone in reverse). Never holds more than `limit + 1`
/// decoded bytes of one layer in memory.
pub fn decode(body: &[u8], codings: &[Coding], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut data = body.to_vec();
    for coding in codings.iter().rev() {
        data = decode_one(&data, *coding, limit)?;
    }
    Ok(data)
}

fn decode_one(data: &[u8], coding: Coding, limit: usize) -> Result<Vec<u8>, DecodeError> {
    match coding {
        Coding::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(data), coding, limit),
        Coding::Deflate => match read_bounded(flate2::read::ZlibDecoder::new(data), coding, limit) {
            Err(DecodeError::Invalid(_)) => read_bounded(flate2::read::DeflateDecoder::new(data), coding, limit),
            other => other,
        },
    }
}

fn read_bounded(reader: impl Read, coding: Coding, limit: usize) -> Result<Vec<u8>, DecodeError> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut out = Vec::new();
    reader.take(cap).read_to_end(&mut out).map_err(|_| DecodeError::Invalid(coding))?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}
