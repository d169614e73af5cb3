//! placeholder stub (being written)
#![allow(dead_code, unused_variables)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span { pub start: u32, pub end: u32 }
impl Span {
    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] { &buf[self.start as usize..self.end as usize] }
    pub fn len(&self) -> usize { (self.end - self.start) as usize }
    pub fn is_empty(&self) -> bool { self.end == self.start }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind { Host, ContentLength, TransferEncoding, Connection, KeepAlive, ProxyConnection, Te, Trailer, Upgrade, Expect, XForwardedFor, XForwardedProto, Forwarded, XRequestId, Via, Cookie, SetCookie, Other }
#[derive(Clone, Copy, Debug)]
pub struct HeaderSpan { pub name: Span, pub value: Span, pub kind: HeaderKind }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method { Get, Head, Post, Put, Delete, Options, Patch, Trace, Connect, Other }
impl Method { pub fn is_idempotent(self) -> bool { todo!() } }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version { Http10, Http11 }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind { None, Length(u64), Chunked, UntilClose }
#[derive(Clone, Copy, Debug)]
pub struct Limits { pub max_header_bytes: usize, pub max_headers: usize }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError { TooLarge, Expectation, Bad(&'static str) }
impl HeadError { pub fn status(self) -> u16 { todo!() } }
pub struct RequestHead {
  pub len: usize, pub method: Method, pub target: Span, pub path: Span, pub query: Option<Span>,
  pub version: Version, pub host: Option<Span>, pub body: BodyKind, pub conn_close: bool,
  pub conn_keep_alive: bool, pub conn_upgrade: bool, pub upgrade: Option<Span>, pub expect_continue: bool,
}
impl RequestHead { pub fn keep_alive(&self) -> bool { todo!() } }
pub fn parse_request(buf: &[u8], limits: &Limits, headers: &mut Vec<HeaderSpan>) -> Result<Option<RequestHead>, HeadError> { todo!() }
pub struct ResponseHead {
  pub len: usize, pub version: Version, pub status: u16, pub body: BodyKind,
  pub conn_close: bool, pub conn_keep_alive: bool, pub conn_upgrade: bool, pub upgrade: Option<Span>,
}
pub fn parse_response(buf: &[u8], request_method: Method, limits: &Limits, headers: &mut Vec<HeaderSpan>) -> Result<Option<ResponseHead>, HeadError> { todo!() }
pub fn named_in_connection(name: &[u8], headers: &[HeaderSpan], buf: &[u8]) -> bool { todo!() }
