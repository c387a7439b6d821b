-- End to end: an embedded Neovim with the plugin and the real server (`difill serve`, the real
-- model). Types in a Python buffer, waits for ghost text, accepts it whole, by word and by
-- line, dismisses it. Records what it sees as JSON; tests/test_nvim.py checks the invariants
-- (the text accepted is the text shown, inserted where the cursor was), which hold for any model.
--
-- Run: nvim --headless --clean -l editors/nvim/tests/e2e.lua CONFIG.json
-- CONFIG: { "cmd": [...server command...], "workdir": "...", "out": "result.json" }
local plugin_dir = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h')
package.path = plugin_dir .. '/tests/?.lua;' .. package.path
local driver = require('driver')

local config = vim.json.decode(table.concat(vim.fn.readfile(arg[1]), '\n'))
local result = { scenarios = {}, log = {} }

local function note(message)
  table.insert(result.log, message)
  io.stderr:write('e2e: ' .. message .. '\n')
end

local function save()
  vim.fn.writefile({ vim.json.encode(result) }, config.out)
end

-- Places where even a weak model tends to say something; the first that yields a suggestion
-- is used. "|" marks the cursor.
local CONTEXTS = {
  { 'import os', '', '', 'def read_config(path):', '    with open(path) as handle:', '        return |',
    '', '', 'print(read_config("setup.cfg"))' },
  { 'def add(a, b):', '    return a + b', '', '', 'print(|)' },
  { 'import numpy as np', '', 'values = np.|' },
  { 'class Point:', '    def __init__(self, x, y):', '        self.x = x', '        self.|' },
  { 'def main():', '    |', '', '', 'if __name__ == "__main__":', '    main()' },
  { 'for index in range(|):', '    print(index)' },
  { 'print(|)' },
  { 'x = [|]' },
  { 's = "|"' },
}

--- Lines without the marker and the 0-based (row, byte col) of the cursor.
local function parse_context(context)
  local lines, row, col = {}, nil, nil
  for i, line in ipairs(context) do
    local at = line:find('|', 1, true)
    if at then
      row, col = i - 1, at - 1
      line = line:sub(1, at - 1) .. line:sub(at + 1)
    end
    table.insert(lines, line)
  end
  return lines, row, col
end

local child = driver.start({ cwd = config.workdir })

--- After a trigger: the snapshot with ghost text, or nil once the request ended with none.
local function wait_ghost(timeout_ms)
  local started = vim.uv.now()
  local seen_pending = false
  return child:wait('a suggestion or an empty answer', timeout_ms, function()
    local snap = child:snapshot() -- ghost and pending from one call: no answer can slip between them
    if snap.ghost ~= vim.NIL then
      return snap
    end
    if snap.pending then
      seen_pending = true
    elseif seen_pending or vim.uv.now() - started > 3000 then
      return 'none'
    end
    return false
  end)
end

local function changed_from(lines)
  return function()
    local snap = child:snapshot()
    return not vim.deep_equal(snap.lines, lines) and snap
  end
end

local function key_for(char)
  return char == '<' and '<lt>' or char
end

local ok, err = xpcall(function()
  child:lua([[
    local cmd, log_file = ...
    vim.o.expandtab = true
    vim.o.shiftwidth = 4
    require('difill').setup({ cmd = cmd, languages = { 'python' }, candidates = 3, log_file = log_file,
      log_level = 'INFO' })
  ]], config.cmd, config.workdir .. '/server.log')
  child:request('nvim_command', 'edit example.py')
  child:wait('the server to start', 60000, function()
    return child:lua([[
      local client = require('difill').get_client(0)
      return client ~= nil and client.initialized == true
    ]])
  end)
  local model = child:wait('the model to load', 120000, function()
    local status = child:lua([[
      local client = require('difill').get_client(0)
      local response = client:request_sync('difill/status', vim.empty_dict(), 5000, 0)
      return response and response.result and response.result.model or false
    ]])
    return status and status.state ~= 'loading' and status
  end)
  result.model = model
  note('model: ' .. vim.inspect(model))
  if model.state ~= 'ready' then
    error('the model did not load: ' .. tostring(model.message))
  end

  -- 1. Manual trigger (<M-\>) at each context until one yields a suggestion.
  local found
  for index, context in ipairs(CONTEXTS) do
    local lines, row, col = parse_context(context)
    child:insert_at(lines, row, col)
    local before = vim.uv.now()
    child:input('<M-\\>')
    local snap = wait_ghost(30000)
    local last = child:lua([[
      local client = require('difill').get_client(0)
      local response = client:request_sync('difill/status', vim.empty_dict(), 5000, 0)
      return response and response.result and response.result.lastRequest or vim.NIL
    ]])
    note(('context %d: %s in %d ms; server: %s'):format(index,
      snap == 'none' and 'no suggestion' or vim.inspect(snap.ghost), vim.uv.now() - before,
      vim.inspect(last, { newline = ' ', indent = '' })))
    if snap ~= 'none' then
      found = { index = index, lines = lines, row = row, col = col }
      result.scenarios.manual = snap
      break
    end
  end
  if not found then
    result.no_suggestion = true
    return
  end
  result.context = found

  -- 2. Automatic trigger: retype the character before the cursor; type the suggestion's first
  --    character (it stays shown, minus that character); accept the rest with <Tab>.
  do
    local lines = vim.deepcopy(found.lines)
    local line = lines[found.row + 1]
    local last = line:sub(found.col, found.col)
    lines[found.row + 1] = line:sub(1, found.col - 1) .. line:sub(found.col + 1)
    child:insert_at(lines, found.row, found.col - 1)
    child:input(key_for(last))
    local shown = wait_ghost(30000)
    if shown == 'none' then
      result.scenarios.auto = { none = true, server = child:lua([[
        local client = require('difill').get_client(0)
        local response = client:request_sync('difill/status', vim.empty_dict(), 5000, 0)
        return response and response.result and response.result.lastRequest or vim.NIL
      ]]), buffer = child:snapshot() }
    else
      local scenario = { shown = shown }
      local first = shown.ghost:sub(1, 1)
      if #shown.ghost > 1 and first:match('^[%w%p ]$') then
        child:input(key_for(first))
        scenario.typed = first
        scenario.after_typing = child:wait('the typed character', 5000, changed_from(shown.lines))
      end
      local before = scenario.after_typing or shown
      if before.ghost ~= vim.NIL then
        child:input('<Tab>')
        scenario.accepted = child:wait('accept', 5000, changed_from(before.lines))
      end
      result.scenarios.auto = scenario
    end
  end

  -- 3. Accept word, then line, then dismiss what is left.
  do
    child:insert_at(found.lines, found.row, found.col)
    child:input('<M-\\>')
    local shown = wait_ghost(30000)
    local scenario = { shown = shown }
    if shown ~= 'none' then
      child:input('<M-Right>')
      scenario.word = child:wait('accept word', 5000, changed_from(shown.lines))
      if scenario.word.ghost ~= vim.NIL then
        child:input('<M-C-Right>')
        scenario.line = child:wait('accept line', 5000, changed_from(scenario.word.lines))
        if scenario.line.ghost ~= vim.NIL then
          child:input('<C-]>')
          scenario.dismissed = child:wait('dismiss', 5000, function()
            local snap = child:snapshot()
            return snap.marks == 0 and snap
          end)
        end
      end
    end
    result.scenarios.partial = scenario
  end

  -- 4. Leaving insert mode hides the suggestion and leaves the buffer alone.
  do
    child:insert_at(found.lines, found.row, found.col)
    child:input('<M-\\>')
    local shown = wait_ghost(30000)
    local scenario = { shown = shown }
    if shown ~= 'none' then
      child:input('<Esc>')
      child:wait_mode('n')
      scenario.left = child:snapshot()
    end
    result.scenarios.escape = scenario
  end

  -- configure{} sends workspace/didChangeConfiguration with the protocol's keys.
  child:lua("require('difill').configure({ max_tokens = 24, constrain_syntax = false })")
  result.configured = child:wait('the new settings on the server', 10000, function()
    local settings = child:lua([[
      local client = require('difill').get_client(0)
      local response = client:request_sync('difill/status', vim.empty_dict(), 5000, 0)
      return response and response.result and response.result.settings or false
    ]])
    return settings and settings.maxTokens == 24 and settings
  end)

  result.status = child:lua([[
    local client = require('difill').get_client(0)
    local response = client:request_sync('difill/status', vim.empty_dict(), 5000, 0)
    return response and response.result or vim.NIL
  ]])

  -- 5. :checkhealth difill runs `difill info --json` and asks the running server.
  child:input('<Esc>')
  child:wait_mode('n')
  child:request('nvim_command', 'checkhealth difill')
  result.health = child:request('nvim_buf_get_lines', 0, 0, -1, false)
end, debug.traceback)

if not ok then
  result.error = err
  note(err)
end
child:stop()
save()
os.exit(ok and 0 or 1)
