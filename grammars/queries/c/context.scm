; Lexical context of a byte position, used to tell code from text.
; @string  literal text: brackets inside do not count, and a cursor inside must stay inside
;          when the document already closes the literal after the cursor.
; @comment comment text: the same rules (a line comment ends at the newline anyway).
; @text    other prose (JSX text): brackets do not count, no containment rule.
; @code    code nested inside a literal (interpolation): innermost capture wins.

(string_literal) @string
(char_literal) @string
(system_lib_string) @string
(comment) @comment
