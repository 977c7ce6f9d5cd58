;; Writes 64 KiB of zeros to stdout at a time, for ever, ignoring whether each write
;; succeeded: the first write past the task's output limit ends the run as `output_limit`.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    ;; One iovec at 0: 64 KiB from address 65536.
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br 0))))
