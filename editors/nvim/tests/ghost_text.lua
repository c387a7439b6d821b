-- Ghost text and the accept/dismiss/cycle keys on known suggestions, in a real (embedded) Neovim
-- with no server: the suggestions go in through require('difill').show_result, exactly as a
-- server answer would. The end-to-end test with the real server is e2e.lua.
-- Run: nvim --headless --clean -l editors/nvim/tests/ghost_text.lua
local plugin_dir = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h')
package.path = plugin_dir .. '/tests/?.lua;' .. package.path
local driver = require('driver')
local t = driver.runner()

local child = driver.start()
child:lua([[
  vim.o.expandtab = true
  vim.o.shiftwidth = 4
  require('difill').setup({ languages = {}, debounce_ms = 50 })
]])

local function show(items, encoding)
  child:lua([[
    local items, encoding = ...
    require('difill').show_result(items, { id = -1, offset_encoding = encoding })
  ]], items, encoding or 'utf-16')
  return child:snapshot()
end

local function range(line, start_char, end_char)
  return { start = { line = line, character = start_char }, ['end'] = { line = line, character = end_char } }
end

t.test('one line: shown inline at the cursor, typed through, accepted', function()
  child:insert_at({ 'x = foo', 'y = 2' }, 0, -1)
  local snap = show({ { insertText = '(1, 2)' } })
  t.eq(snap.ghost, '(1, 2)', 'suggestion')
  t.eq(snap.shown, '(1, 2)', 'ghost text')
  t.eq(snap.mark_pos, { 0, 7 }, 'extmark at the cursor')
  t.eq(snap.virt_text_pos, 'inline')
  child:input('(')
  snap = child:wait('ghost after typing (', 2000, function()
    local s = child:snapshot()
    return s.lines[1] == 'x = foo(' and s
  end)
  t.eq(snap.ghost, '1, 2)', 'typing a matching character keeps the rest')
  t.eq(snap.shown, '1, 2)')
  child:input('<Tab>')
  snap = child:wait('accept', 2000, function()
    local s = child:snapshot()
    return s.lines[1] ~= 'x = foo(' and s
  end)
  t.eq(snap.lines, { 'x = foo(1, 2)', 'y = 2' }, 'buffer')
  t.eq(snap.cursor, { 0, 13 }, 'cursor after the inserted text')
  t.eq(snap.marks, 0, 'ghost gone after accepting')
  t.eq(snap.mode, 'i')
end)

t.test('multi-line item whose range starts before the cursor (UTF-16 columns)', function()
  -- "é" is 2 bytes and 1 UTF-16 unit: the range start (character 9) is byte 10.
  child:insert_at({ 's = "é"; de', 'end' }, 0, -1)
  local snap = show({ { insertText = 'def f():\n    return 1', range = range(0, 9, 11) } })
  t.eq(snap.ghost, 'f f():\n    return 1', 'the typed "de" is not shown again')
  t.eq(snap.shown, 'f f():\n    return 1', 'first line inline, the rest as virtual lines')
  child:input('<M-C-Right>')
  snap = child:wait('accept line', 2000, function()
    local s = child:snapshot()
    return s.lines[1] ~= 's = "é"; de' and s
  end)
  t.eq(snap.lines[1], 's = "é"; def f():', 'accept line takes the rest of the line')
  t.eq(snap.ghost, '\n    return 1', 'and leaves the other lines')
  child:input('<M-Right>')
  snap = child:wait('accept word', 2000, function()
    local s = child:snapshot()
    return #s.lines == 3 and s
  end)
  t.eq(snap.lines, { 's = "é"; def f():', '    ', 'end' }, 'accept word at a line break: break and indent')
  t.eq(snap.cursor, { 1, 4 })
  t.eq(snap.ghost, 'return 1')
  child:input('<M-Right>')
  snap = child:wait('accept word 2', 2000, function()
    local s = child:snapshot()
    return s.lines[2] ~= '    ' and s
  end)
  t.eq(snap.lines[2], '    return', 'one word')
  t.eq(snap.ghost, ' 1')
  child:input('<Tab>')
  snap = child:wait('accept rest', 2000, function()
    local s = child:snapshot()
    return s.lines[2] ~= '    return' and s
  end)
  t.eq(snap.lines, { 's = "é"; def f():', '    return 1', 'end' })
  t.eq(snap.cursor, { 1, 12 })
  t.eq(snap.marks, 0)
end)

t.test('an item that replaces text after the cursor (a closing bracket)', function()
  child:insert_at({ 'print()' }, 0, 6)
  local snap = show({ { insertText = 'x)', range = range(0, 6, 7) } })
  t.eq(snap.shown, 'x', 'the bracket already in the buffer is not shown twice')
  child:input('<Tab>')
  snap = child:wait('accept', 2000, function()
    local s = child:snapshot()
    return s.lines[1] ~= 'print()' and s
  end)
  t.eq(snap.lines, { 'print(x)' }, 'the range is replaced, not appended to')
  t.eq(snap.cursor, { 0, 8 })
end)

t.test('typing something else removes the suggestion', function()
  child:insert_at({ 'value = ' }, 0, -1)
  local snap = show({ { insertText = 'compute()' } })
  t.eq(snap.marks, 1)
  child:input('Z')
  snap = child:wait('typed Z', 2000, function()
    local s = child:snapshot()
    return s.lines[1] == 'value = Z' and s
  end)
  t.eq(snap.marks, 0)
  t.eq(snap.ghost, vim.NIL)
end)

t.test('moving the cursor without typing removes the suggestion', function()
  child:insert_at({ 'value = ab' }, 0, -1)
  t.eq(show({ { insertText = 'abcd()', range = range(0, 8, 10) } }).ghost, 'cd()', 'sanity')
  child:input('<Left>')
  local snap = child:wait('cursor moved', 2000, function()
    local s = child:snapshot()
    return s.cursor[2] == 9 and s
  end)
  t.eq(snap.marks, 0, 'no ghost text after moving left, though "a" still matches the item')
  t.eq(snap.ghost, vim.NIL)
end)

t.test('dismiss key and leaving insert mode remove the suggestion, buffer untouched', function()
  child:insert_at({ 'value = ' }, 0, -1)
  t.eq(show({ { insertText = 'compute()' } }).marks, 1)
  child:input('<C-]>')
  local snap = child:wait('dismiss', 2000, function()
    local s = child:snapshot()
    return s.marks == 0 and s
  end)
  t.eq(snap.lines, { 'value = ' })
  t.eq(snap.mode, 'i')
  t.eq(show({ { insertText = 'compute()' } }).marks, 1)
  child:input('<Esc>')
  child:wait_mode('n')
  snap = child:snapshot()
  t.eq(snap.marks, 0)
  t.eq(snap.lines, { 'value = ' })
end)

t.test('next/previous candidate', function()
  child:insert_at({ 'value = ' }, 0, -1)
  local snap = show({ { insertText = 'first()' }, { insertText = 'second()' } })
  t.eq(snap.ghost, 'first()')
  child:input('<M-]>')
  snap = child:wait('next', 2000, function()
    local s = child:snapshot()
    return s.ghost == 'second()' and s
  end)
  t.eq(snap.shown, 'second()')
  child:input('<M-[>')
  child:wait('previous', 2000, function()
    return child:snapshot().ghost == 'first()'
  end)
  child:input('<Tab>')
  snap = child:wait('accept', 2000, function()
    local s = child:snapshot()
    return s.lines[1] ~= 'value = ' and s
  end)
  t.eq(snap.lines, { 'value = first()' })
end)

t.test('keys keep their usual meaning when no suggestion is shown', function()
  child:insert_at({ 'if x:' }, 0, -1)
  child:input('<CR><Tab>y')
  local snap = child:wait('typed', 2000, function()
    local s = child:snapshot()
    return #s.lines == 2 and s.lines[2]:find('y') and s
  end)
  t.eq(snap.lines[2]:match('^%s*'):len() > 0, true, '<Tab> indented')
  t.eq(snap.marks, 0)
end)

child:stop()
t.finish()
