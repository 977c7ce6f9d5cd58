;; Executes `unreachable`: an explicit trap, reported as `trap`.
(module
  (memory (export "memory") 1)
  (func (export "_start") unreachable))
