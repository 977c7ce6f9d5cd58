;; Tries to accept a connection on fd 3, as if a socket had been handed to it. WASI preview
;; 1 has no way to open a socket, and a task is given none, so the call fails with EBADF:
;; the module writes "denied" if it failed and "opened" if it did not, and exits normally.
(module
  (import "wasi_snapshot_preview1" "sock_accept"
    (func $sock_accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "denied")
  (data (i32.const 300) "opened")
  (func (export "_start")
    (local $errno i32)
    (local.set $errno (call $sock_accept (i32.const 3) (i32.const 0) (i32.const 16)))
    (i32.store (i32.const 0) (select (i32.const 200) (i32.const 300) (local.get $errno)))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
