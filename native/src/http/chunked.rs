//! placeholder stub (being written)
#![allow(dead_code, unused_variables)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError { BadSize, Overflow, BadLineEnd, ExtensionTooLong, TrailersTooLarge }
#[derive(Clone, Debug, Default)]
pub struct ChunkedDecoder { s: u8 }
impl ChunkedDecoder {
  pub fn new() -> Self { todo!() }
  pub fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), ChunkError> { todo!() }
  pub fn is_done(&self) -> bool { todo!() }
}
