//! One HTTP/1.1 message reader for the demo API and the scenario runner's Envoy driver (their
//! hand-rolled codecs, merged). Heads are parsed by `httparse`; the body is read by
//! `content-length`, by `transfer-encoding: chunked` (with its trailers) or, for a response with
//! neither, to the end of the connection. Header names are lower-cased, values kept as sent
//! (without surrounding whitespace), repeated headers kept in order.

use std::io::{BufRead, Read};

/// What is being read: requests have no body without a length; responses read to the end;
/// a response to a HEAD request has no body whatever its headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Response,
    ResponseToHead,
}

/// Bounds on what one message may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The start line and headers, in bytes.
    pub max_head: usize,
    /// The body, in bytes.
    pub max_body: usize,
    /// The number of headers.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_head: 64 * 1024, max_body: usize::MAX, max_headers: 128 }
    }
}

/// One message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The start line as sent (`POST /x HTTP/1.1`, `HTTP/1.1 200 OK`), without its line end.
    pub start: String,
    /// Request: the method; response: empty.
    pub method: String,
    /// Request: the target; response: empty.
    pub path: String,
    /// Response: the status code; request: 0.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// A chunked body's trailers.
    pub trailers: Vec<(String, String)>,
}

impl Message {
    /// The first value of a header (names are lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a message could not be read (the text says what was wrong).
#[derive(Debug, Clone, PartialEq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn io(e: std::io::Error) -> Error {
    Error(e.to_string())
}

/// Reads one message; `Ok(None)` when the peer closed the connection before one began. Empty
/// lines before the start line are skipped (RFC 9112 2.2).
pub fn read_message(reader: &mut impl BufRead, kind: Kind, limits: &Limits) -> Result<Option<Message>, Error> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(Error("connection closed mid-message".into())) };
        }
        head.extend_from_slice(&line);
        if head.len() > limits.max_head {
            return Err(Error("message head too large".into()));
        }
        if line == b"\r\n" || line == b"\n" {
            if head.len() <= 2 {
                head.clear();
                continue;
            }
            break;
        }
    }
    let start = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default())
        .trim_end()
        .to_string();
    let mut storage = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let (method, path, status, parsed) = match kind {
        Kind::Request => {
            let mut r = httparse::Request::new(&mut storage);
            complete(r.parse(&head))?;
            (r.method.unwrap_or("").to_string(), r.path.unwrap_or("").to_string(), 0, pairs(r.headers))
        }
        Kind::Response | Kind::ResponseToHead => {
            let mut r = httparse::Response::new(&mut storage);
            complete(r.parse(&head))?;
            (String::new(), String::new(), r.code.unwrap_or(0), pairs(r.headers))
        }
    };
    let mut message = Message { start, method, path, status, headers: parsed, body: Vec::new(), trailers: Vec::new() };
    if kind == Kind::ResponseToHead {
        return Ok(Some(message));
    }
    if message.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let (body, trailers) = read_chunked(reader, limits)?;
        message.body = body;
        message.trailers = trailers;
    } else if let Some(length) = message.header("content-length") {
        let length: usize = length.trim().parse().map_err(|_| Error("bad content-length".into()))?;
        if length > limits.max_body {
            return Err(Error("body too large".into()));
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(io)?;
        message.body = body;
    } else if kind == Kind::Response {
        reader.take(limits.max_body as u64).read_to_end(&mut message.body).map_err(io)?;
    }
    Ok(Some(message))
}

fn complete(r: httparse::Result<usize>) -> Result<(), Error> {
    match r {
        Ok(httparse::Status::Complete(_)) => Ok(()),
        Ok(httparse::Status::Partial) => Err(Error("incomplete message head".into())),
        Err(e) => Err(Error(e.to_string())),
    }
}

fn pairs(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .take_while(|h| !h.name.is_empty())
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect()
}

/// Header or trailer fields, in order.
type Fields = Vec<(String, String)>;

/// A chunked body and its trailers.
fn read_chunked(reader: &mut impl BufRead, limits: &Limits) -> Result<(Vec<u8>, Fields), Error> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line).map_err(io)?;
        let size_text = size_line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_text, 16).map_err(|_| Error("bad chunk size".into()))?;
        if body.len().saturating_add(size) > limits.max_body {
            return Err(Error("body too large".into()));
        }
        if size == 0 {
            // The trailer section, up to the empty line.
            let mut trailers = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).map_err(io)? == 0 {
                    return Ok((body, trailers));
                }
                let line = line.trim_end();
                if line.is_empty() {
                    return Ok((body, trailers));
                }
                if let Some((k, v)) = line.split_once(':') {
                    trailers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).map_err(io)?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).map_err(io)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], kind: Kind) -> Result<Option<Message>, Error> {
        read_message(&mut std::io::BufReader::new(bytes), kind, &Limits { max_body: 100, ..Limits::default() })
    }

    #[test]
    fn a_request_with_a_length() {
        let m =
            read(b"\r\nPOST /x?a=1 HTTP/1.1\r\nHost: h\r\nX-Dup: a\r\nx-dup: b\r\nContent-Length: 3\r\n\r\nabc", Kind::Request)
                .unwrap()
                .unwrap();
        assert_eq!((m.method.as_str(), m.path.as_str(), m.start.as_str()), ("POST", "/x?a=1", "POST /x?a=1 HTTP/1.1"));
        assert_eq!(m.headers[1..3], [("x-dup".to_string(), "a".to_string()), ("x-dup".to_string(), "b".to_string())]);
        assert_eq!(m.body, b"abc");
    }

    #[test]
    fn a_chunked_request_with_trailers() {
        let m = read(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nx-sum: 9\r\n\r\n",
            Kind::Request,
        )
        .unwrap()
        .unwrap();
        assert_eq!(m.body, b"abcde");
        assert_eq!(m.trailers, [("x-sum".to_string(), "9".to_string())]);
    }

    #[test]
    fn a_response_to_the_end_of_the_connection() {
        let m = read(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\r\ndown", Kind::Response)
            .unwrap()
            .unwrap();
        assert_eq!((m.status, m.body.as_slice()), (503, &b"down"[..]));
    }

    #[test]
    fn a_response_to_head_has_no_body() {
        let m = read(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Kind::ResponseToHead).unwrap().unwrap();
        assert_eq!((m.status, m.body.len()), (200, 0));
    }

    #[test]
    fn limits_and_malformed_messages() {
        assert_eq!(read(b"", Kind::Request), Ok(None));
        assert!(read(b"GET / HTTP/1.1\r\nhost: h\r\n", Kind::Request).is_err());
        assert!(read(b"POST / HTTP/1.1\r\ncontent-length: 101\r\n\r\n", Kind::Request).is_err());
        assert!(read(b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n", Kind::Request).is_err());
        assert!(read(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", Kind::Request).is_err());
        assert!(read(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", Kind::Request).is_err());
    }
}
