//! Black-box tests of `ivy serve`: a real server on a loopback port, spoken to as clients do.
//! Each test names the protocol page's row it checks.

mod answer_cache;
mod faults;
mod frames;
mod harness;
mod hostile;
mod http_rows;
mod limits;
mod ws_rows;
