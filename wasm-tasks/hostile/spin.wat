;; An endless loop: ends at its timeout (epoch interruption), or when cancelled.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop (br 0))))
