;; Tries to open /etc/passwd through the first preopened directory (fd 3). A task has no
;; preopened directories, so WASI answers EBADF (8): the module writes "denied" if the
;; open failed and "opened" if it did not, and exits normally.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "etc/passwd")
  (data (i32.const 200) "denied")
  (data (i32.const 300) "opened")
  (func (export "_start")
    (local $errno i32)
    ;; path_open(dirfd 3, lookup flags 0, path, path len, oflags 0, rights base (fd_read),
    ;; rights inheriting (none), fd flags 0, where the new fd goes)
    (local.set $errno
      (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 10)
        (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 16)))
    ;; One iovec at 0: the answer, 6 bytes.
    (i32.store (i32.const 0) (select (i32.const 200) (i32.const 300) (local.get $errno)))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
