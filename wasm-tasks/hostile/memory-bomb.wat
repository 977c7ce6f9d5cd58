;; Grows its linear memory by 1 MiB at a time, for ever: the node's memory limiter refuses
;; the growth past the task's limit, with a trap reported as `memory_limit`.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop
      (drop (memory.grow (i32.const 16)))
      (br 0))))
