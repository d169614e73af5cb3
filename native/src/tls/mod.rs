pub mod client_hello;
