;; Reports what a task can see of its host, as four ASCII digits on stdout: how many
;; arguments it has (its name counts), how many environment variables, whether the wall
;; clock reads anything but the Unix epoch (1) or not (0), and the same for the monotonic
;; clock. Without grants it prints "1000". The agent's sandbox tests and the integration
;; tests (`tests/integration/grants.rs`) read this file.
(module
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 100) (i32.const 104)))
    (drop (call $environ_sizes_get (i32.const 108) (i32.const 112)))
    ;; Clock 0 is the wall clock, 1 the monotonic one.
    (drop (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 120)))
    (drop (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 128)))
    (i32.store8 (i32.const 200) (i32.add (i32.const 48) (i32.load (i32.const 100))))
    (i32.store8 (i32.const 201) (i32.add (i32.const 48) (i32.load (i32.const 108))))
    (i32.store8 (i32.const 202)
      (select (i32.const 49) (i32.const 48) (i64.ne (i64.load (i32.const 120)) (i64.const 0))))
    (i32.store8 (i32.const 203)
      (select (i32.const 49) (i32.const 48) (i64.ne (i64.load (i32.const 128)) (i64.const 0))))
    ;; One iovec at 0: the four digits.
    (i32.store (i32.const 0) (i32.const 200))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
