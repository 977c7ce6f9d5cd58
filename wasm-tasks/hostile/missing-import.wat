;; Imports a function no apiary host provides: the module cannot be instantiated, which is
;; reported as `invalid_module` before any of it runs.
(module
  (import "env" "launch_missiles" (func $launch))
  (memory (export "memory") 1)
  (func (export "_start") (call $launch)))
