--- Pure string functions behind the ghost text: what is left of a suggestion once the user has
--- typed part of it, and which piece "accept word" and "accept line" take. Kept free of buffer
--- and window state so that tests/unit.lua can check them without a server.
local M = {}

--- Bytes that belong to a word: ASCII letters, digits, underscore, and every byte of a multi-byte
--- UTF-8 character (so that a word is never cut inside a character).
local WORD = '[%w_\128-\255]'

--- The part of `text` not typed yet, or nil when what was typed since the suggestion's start
--- (`typed`) is not a prefix of it, which means the suggestion no longer applies.
---@param text string the suggestion's insertText
---@param typed string the buffer text between the suggestion's range start and the cursor
---@return string|nil
function M.remaining(text, typed)
  if typed == '' then
    return text
  end
  if #typed > #text or text:sub(1, #typed) ~= typed then
    return nil
  end
  return text:sub(#typed + 1)
end

--- The next word of `ghost`: leading blanks plus one run of word characters, or one run of
--- punctuation; at a line break, the break plus the next line's indentation.
---@param ghost string
---@return string
function M.next_word(ghost)
  if ghost == '' then
    return ''
  end
  local piece = ghost:match('^\r?\n[ \t]*')
    or ghost:match('^[ \t]*' .. WORD .. '+')
    or ghost:match('^[ \t]*[^%w_%s\128-\255]+')
    or ghost:match('^[ \t]+')
  return piece or ghost:sub(1, 1)
end

--- The rest of the current line of `ghost` (without its line break); when `ghost` starts at a
--- line break, that break plus the next line, so that repeated presses walk down the lines.
---@param ghost string
---@return string
function M.next_line(ghost)
  if ghost == '' then
    return ''
  end
  local newline = ghost:match('^\r?\n')
  if newline then
    local rest = ghost:sub(#newline + 1)
    return newline .. (rest:match('^[^\r\n]*') or '')
  end
  return ghost:match('^[^\r\n]*')
end

--- Split on line breaks, keeping empty lines (the format nvim_buf_set_text wants).
---@param text string
---@return string[]
function M.lines(text)
  return vim.split(text:gsub('\r\n', '\n'), '\n', { plain = true })
end

--- Replace tabs by spaces up to the next tab stop. Virtual text shows a tab as a single cell,
--- so ghost text with tabs would be misaligned with the real text it becomes on accept.
---@param line string
---@param start_col integer display column where `line` begins (0-based)
---@param tabstop integer
---@return string
function M.expand_tabs(line, start_col, tabstop)
  if not line:find('\t', 1, true) then
    return line
  end
  tabstop = math.max(tabstop, 1)
  local out = {}
  local col = start_col
  for char in line:gmatch('[%z\1-\127\194-\244][\128-\191]*') do
    if char == '\t' then
      local width = tabstop - (col % tabstop)
      table.insert(out, string.rep(' ', width))
      col = col + width
    else
      table.insert(out, char)
      col = col + vim.fn.strdisplaywidth(char)
    end
  end
  return table.concat(out)
end

--- Plain text of a snippet insertText: `${1:name}` becomes `name`, `$1`/`$0` disappear and
--- escaped characters are unescaped. Good enough to preview and to insert a snippet as text.
---@param snippet string
---@return string
function M.snippet_text(snippet)
  -- Hide escaped characters from the placeholder patterns, then put them back unescaped.
  local escaped = { ['$'] = '\1', ['}'] = '\2', ['\\'] = '\3' }
  local text = snippet:gsub('\\([%$}\\])', escaped)
  for _ = 1, 8 do -- nested placeholders
    local replaced
    text, replaced = text:gsub('%${%d+:([^{}]*)}', '%1')
    if replaced == 0 then
      break
    end
  end
  text = text:gsub('%${%d+|([^,|]*)[^}]*}', '%1'):gsub('%${%d+}', ''):gsub('%$%d+', '')
  text = text:gsub('[\1\2\3]', { ['\1'] = '$', ['\2'] = '}', ['\3'] = '\\' })
  return text
end

return M
