;; Calls the host APIs it was not granted: writes a key of the app store, publishes on a
;; topic, and reads a key with a buffer pointer far outside its memory. Each call must come
;; back with an error status (-1, not granted), never trap or reach the store: the module
;; writes "denied" if all three got -1 and "reached" otherwise, and exits normally.
(module
  (import "apiary" "kv_put"
    (func $kv_put (param i32 i32 i32 i32 i32) (result i32)))
  (import "apiary" "publish"
    (func $publish (param i32 i32 i32 i32) (result i32)))
  (import "apiary" "kv_get"
    (func $kv_get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "stolen")
  (data (i32.const 200) "denied")
  (data (i32.const 300) "reached")
  (func (export "_start")
    (local $denied i32)
    (local.set $denied
      (i32.and
        (i32.and
          (i32.eq (call $kv_put (i32.const 100) (i32.const 6) (i32.const 100) (i32.const 6) (i32.const 16)) (i32.const -1))
          (i32.eq (call $publish (i32.const 100) (i32.const 6) (i32.const 100) (i32.const 6)) (i32.const -1)))
        (i32.eq (call $kv_get (i32.const 100) (i32.const 6) (i32.const 0x7fffff00) (i32.const 64) (i32.const 16) (i32.const 24)) (i32.const -1))))
    (i32.store (i32.const 0) (select (i32.const 200) (i32.const 300) (local.get $denied)))
    (i32.store (i32.const 4) (select (i32.const 6) (i32.const 7) (local.get $denied)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
