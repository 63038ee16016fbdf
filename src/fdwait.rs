//! Waiting until an fd takes more bytes. An output we were handed in
//! non-blocking mode (an `O_NONBLOCK` pipe as stdout, set by whoever made it)
//! answers a full buffer with `EAGAIN` instead of blocking; the copy then
//! waits here before writing again.

use std::os::fd::BorrowedFd;

use rustix::event::{PollFd, PollFlags, poll};

/// Block until `fd` can take more bytes (`POLLOUT`), or reports an error or
/// a hang-up (the next write then fails with it). A signal ends the wait with
/// `Err(Errno::INTR)`, so that the caller checks for it
/// ([`crate::signals::check`]) before writing again.
pub fn wait_writable(fd: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
    poll(&mut fds, None).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::OFlags;
    use rustix::io::Errno;
    use std::os::fd::AsFd;

    #[test]
    fn waits_until_a_full_pipe_is_read() {
        let (read, write) = rustix::pipe::pipe().unwrap();
        rustix::fs::fcntl_setfl(&write, OFlags::NONBLOCK).unwrap();
        let chunk = [7u8; 4096];
        let mut written = 0usize;
        loop {
            match rustix::io::write(&write, &chunk) {
                Ok(n) => written += n,
                Err(Errno::AGAIN) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(written < 64 << 20, "the pipe never filled");
        }
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let mut buf = vec![0u8; 65536];
            rustix::io::read(&read, &mut buf).unwrap();
            read
        });
        wait_writable(write.as_fd()).unwrap();
        assert!(rustix::io::write(&write, &chunk).is_ok());
        drop(reader.join().unwrap());
        // A pipe whose reader is gone: the wait ends, the write says why.
        wait_writable(write.as_fd()).unwrap();
        assert_eq!(rustix::io::write(&write, &chunk), Err(Errno::PIPE));
    }
}
