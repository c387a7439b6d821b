-- Unit tests of the pure parts of the plugin (options, server settings, suggestion text).
-- Run: nvim --headless --clean -l editors/nvim/tests/unit.lua
-- Prints one line per test and exits 1 when any fails (tests/test_nvim_unit.py runs it).
local plugin_dir = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h')
vim.opt.runtimepath:prepend(plugin_dir)

local config = require('difill.config')
local text = require('difill.text')

local failures = 0
local function test(name, fn)
  local ok, err = pcall(fn)
  if ok then
    io.stdout:write('ok   ' .. name .. '\n')
  else
    failures = failures + 1
    io.stdout:write('FAIL ' .. name .. ': ' .. tostring(err) .. '\n')
  end
end

local function eq(actual, expected, what)
  if not vim.deep_equal(actual, expected) then
    error(('%s: expected %s, got %s'):format(what or 'value', vim.inspect(expected), vim.inspect(actual)), 2)
  end
end

local function raises(fn, pattern)
  local ok, err = pcall(fn)
  if ok then
    error('expected an error matching ' .. pattern, 2)
  end
  if not tostring(err):find(pattern) then
    error(('error %q does not match %q'):format(tostring(err), pattern), 2)
  end
end

test('defaults resolve', function()
  local c = config.resolve(nil)
  eq(c.cmd, { 'difill', 'serve' }, 'cmd')
  eq(c.backend, 'torch')
  eq(c.keymaps.accept, '<Tab>')
  eq(c.languages, config.default_languages)
end)

test('user options replace defaults, lists are not merged by index', function()
  local c = config.resolve({ languages = { 'lua' }, keymaps = { accept = '<M-l>', next = false }, steps = 8 })
  eq(c.languages, { 'lua' })
  eq(c.keymaps.accept, '<M-l>')
  eq(c.keymaps.next, false)
  eq(c.keymaps.accept_word, '<M-Right>', 'other keys keep their default')
  eq(c.steps, 8)
  eq(config.resolve({ cmd = { 'python3', '-m', 'difill', 'serve' } }).cmd, { 'python3', '-m', 'difill', 'serve' })
  eq(config.resolve({ cmd = '/opt/difill' }).cmd, { '/opt/difill', 'serve' }, 'a string cmd')
end)

test('bad options give a clear error', function()
  raises(function() config.resolve({ backend = 'tensorflow' }) end, "backend must be 'torch' or 'onnx'")
  raises(function() config.resolve({ debounce_ms = -1 }) end, 'debounce_ms')
  raises(function() config.resolve({ modle = 'x' }) end, 'unknown option "modle"')
  raises(function() config.resolve({ keymaps = { acept = 'x' } }) end, 'unknown keymap "acept"')
  raises(function() config.resolve({ languages = 'python' }) end, 'languages')
  raises(function() config.resolve('python') end, 'expected a table')
end)

test('server settings use the protocol keys', function()
  local s = config.server_settings(config.resolve({ model = '/m', device = 'cuda', dtype = 'bfloat16', steps = 4, max_tokens = 32,
    constrain_syntax = false, debounce_ms = 80, languages = { 'python' } }))
  eq(s.model, "/m")
  eq(s.backend, 'torch')
  eq(s.device, 'cuda')
  eq(s.dtype, 'bfloat16')
  eq(s.steps, 4)
  eq(s.maxTokens, 32)
  eq(s.constrainSyntax, false)
  eq(s.debounceMs, 80)
  eq(s.adaptiveDebounce, false, 'a fixed debounce turns the adaptive one off')
  eq(s.languages, { 'python' })
  local defaults = config.server_settings(config.resolve({ languages = '*' }))
  eq(defaults.model, vim.NIL, 'no model path: the server picks its bundled model')
  eq(defaults.dtype, vim.NIL, "no dtype: the server's default for the device")
  eq(defaults.languages, vim.NIL, "'*': every language")
  eq(defaults.adaptiveDebounce, true)
  eq(defaults.debounceMs, nil, 'no fixed debounce by default')
  eq(vim.json.decode(vim.json.encode(defaults)).steps, vim.NIL, 'nil options travel as JSON null')
end)

test('info command derives from the server command', function()
  eq(config.info_cmd(config.resolve({ cmd = { 'python', '-m', 'difill', 'serve' }, model = '/m' })),
    { 'python', '-m', 'difill', 'info', '--json', '--model', '/m', '--backend', 'torch', '--device', 'cpu' })
  eq(config.server_cmd(config.resolve({ log_level = 'DEBUG', log_file = '/tmp/l' })),
    { 'difill', 'serve', '--log-level', 'DEBUG', '--log-file', '/tmp/l' })
end)

test('remaining: typed prefix of the suggestion', function()
  eq(text.remaining('return x', ''), 'return x')
  eq(text.remaining('return x', 'ret'), 'urn x')
  eq(text.remaining('return x', 'return x'), '')
  eq(text.remaining('return x', 'rex'), nil, 'mismatch')
  eq(text.remaining('ab', 'abc'), nil, 'typed past the end')
end)

test('next word', function()
  eq(text.next_word('foo(bar)'), 'foo')
  eq(text.next_word('(bar)'), '(')
  eq(text.next_word('  x = 1'), '  x')
  eq(text.next_word(' = 1'), ' =')
  eq(text.next_word('\n    return x'), '\n    ')
  eq(text.next_word('))\n'), '))')
  eq(text.next_word('héllo wörld'), 'héllo', 'multi-byte characters stay whole')
  eq(text.next_word('   '), '   ')
  eq(text.next_word(''), '')
end)

test('next line', function()
  eq(text.next_line('x + 1)\n    return y'), 'x + 1)')
  eq(text.next_line('\n    return y\nz'), '\n    return y')
  eq(text.next_line('last'), 'last')
  eq(text.next_line(''), '')
end)

test('accepting words or lines one by one rebuilds the whole suggestion', function()
  for _, step in ipairs({ text.next_word, text.next_line }) do
    local suggestion = 'if x:\n\treturn foo(a, b)\n\n  # done'
    local ghost, built, guard = suggestion, '', 0
    while ghost ~= '' do
      local piece = step(ghost)
      assert(#piece > 0, 'no progress at ' .. vim.inspect(ghost))
      built = built .. piece
      ghost = text.remaining(suggestion, built)
      guard = guard + 1
      assert(guard < 100)
    end
    eq(built, suggestion)
  end
end)

test('lines and tabs', function()
  eq(text.lines('a\r\nb\n'), { 'a', 'b', '' })
  eq(text.expand_tabs('\tx', 0, 4), '    x')
  eq(text.expand_tabs('\tx', 2, 4), '  x')
  eq(text.expand_tabs('ab\tc', 0, 8), 'ab      c')
end)

test('snippet text', function()
  eq(text.snippet_text('foo(${1:a}, ${2:b})$0'), 'foo(a, b)')
  eq(text.snippet_text('x = \\$1'), 'x = $1')
end)

io.stdout:write((failures == 0 and 'all passed' or (failures .. ' failed')) .. '\n')
os.exit(failures == 0 and 0 or 1)
