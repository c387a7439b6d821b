-- Drives a second, embedded Neovim over its msgpack RPC channel, like a user at a keyboard:
-- keys go in through nvim_input and are processed by the child's main loop, so insert mode,
-- autocommands (TextChangedI, CursorMovedI), mappings and LSP traffic all behave as in a real
-- session. Used by ghost_text.lua and e2e.lua, which run under `nvim --headless --clean -l`.
local M = {}

M.plugin_dir = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h')

---@class difill.test.Child
---@field chan integer
local Child = {}
Child.__index = Child

--- Start an embedded child Neovim with the plugin on its runtimepath.
---@param opts {cwd: string|nil}|nil
---@return difill.test.Child
function M.start(opts)
  opts = opts or {}
  local cmd = { vim.v.progpath, '--embed', '--headless', '--clean', '-n',
    '--cmd', 'set runtimepath^=' .. vim.fn.fnameescape(M.plugin_dir) }
  local chan = vim.fn.jobstart(cmd, { rpc = true, cwd = opts.cwd })
  assert(chan > 0, 'cannot start ' .. vim.v.progpath)
  local child = setmetatable({ chan = chan }, Child)
  return child
end

function Child:request(method, ...)
  return vim.rpcrequest(self.chan, method, ...)
end

--- Run Lua in the child; `...` arrive there as `...`.
function Child:lua(code, ...)
  return self:request('nvim_exec_lua', code, { ... })
end

--- Type keys (key notation, e.g. 'abc<Tab>'); they are processed asynchronously.
function Child:input(keys)
  self:request('nvim_input', keys)
end

--- Poll `fn` every 20 ms until it returns a truthy value; error with `what` after `timeout_ms`.
function Child:wait(what, timeout_ms, fn)
  local deadline = vim.uv.now() + timeout_ms
  while true do
    local value = fn()
    if value then
      return value
    end
    if vim.uv.now() > deadline then
      error(('timed out after %d ms waiting for %s'):format(timeout_ms, what), 2)
    end
    vim.uv.sleep(20)
    vim.uv.update_time()
  end
end

function Child:mode()
  return self:request('nvim_get_mode').mode
end

--- Wait until the child has processed the keys sent so far and is in `mode` ('i' or 'n').
function Child:wait_mode(mode, timeout_ms)
  return self:wait('mode ' .. mode, timeout_ms or 2000, function()
    local state = self:request('nvim_get_mode')
    return state.mode == mode and not state.blocking
  end)
end

--- What the user sees and what the plugin holds: buffer lines, cursor, mode, the suggestion's
--- remaining text, and the ghost text rebuilt from the extmarks in the plugin's namespace.
function Child:snapshot()
  return self:lua([[
    local difill = require('difill')
    local marks = vim.api.nvim_buf_get_extmarks(0, difill.ns, 0, -1, { details = true })
    local shown, mark_pos, virt_text_pos = nil, nil, nil
    if #marks > 0 then
      local details = marks[1][4]
      local parts = {}
      for _, chunk in ipairs(details.virt_text or {}) do
        if chunk[2] == 'DifillGhost' then table.insert(parts, chunk[1]) end
      end
      for _, line in ipairs(details.virt_lines or {}) do
        table.insert(parts, '\n')
        for _, chunk in ipairs(line) do
          if chunk[2] == 'DifillGhost' then table.insert(parts, chunk[1]) end
        end
      end
      shown = table.concat(parts)
      mark_pos = { marks[1][2], marks[1][3] }
      virt_text_pos = details.virt_text_pos
    end
    local cursor = vim.api.nvim_win_get_cursor(0)
    return {
      lines = vim.api.nvim_buf_get_lines(0, 0, -1, false),
      cursor = { cursor[1] - 1, cursor[2] },
      mode = vim.api.nvim_get_mode().mode,
      ghost = difill.get_suggestion() or vim.NIL,
      shown = shown or vim.NIL,
      marks = #marks,
      mark_pos = mark_pos or vim.NIL,
      virt_text_pos = virt_text_pos or vim.NIL,
      pending = difill.is_pending(),
    }
  ]])
end

--- Leave insert mode, replace the buffer with `lines`, put the cursor on (row, col) (0-based,
--- byte col; col = -1 for the end of the line) and enter insert mode there.
function Child:insert_at(lines, row, col)
  self:input('<Esc>')
  self:wait_mode('n')
  self:lua([[
    local lines, row, col = ...
    vim.api.nvim_buf_set_lines(0, 0, -1, false, lines)
    if col < 0 then col = #lines[row + 1] end
    vim.api.nvim_win_set_cursor(0, { row + 1, col })
  ]], lines, row, col)
  local line = lines[row + 1]
  if col < 0 or col >= #line then
    self:input('A')
  else
    self:input('i')
  end
  self:wait_mode('i')
end

function Child:stop()
  pcall(self.request, self, 'nvim_command', 'qall!')
  pcall(vim.fn.jobstop, self.chan)
end

--- A tiny test runner: test(name, fn) runs fn(), printing ok/FAIL; finish() exits 1 on failure.
function M.runner()
  local failures = 0
  local runner = {}
  function runner.test(name, fn)
    local ok, err = xpcall(fn, debug.traceback)
    if ok then
      io.stdout:write('ok   ' .. name .. '\n')
    else
      failures = failures + 1
      io.stdout:write('FAIL ' .. name .. ': ' .. tostring(err) .. '\n')
    end
  end
  function runner.eq(actual, expected, what)
    if not vim.deep_equal(actual, expected) then
      error(('%s: expected %s, got %s'):format(what or 'value', vim.inspect(expected), vim.inspect(actual)), 2)
    end
  end
  function runner.finish()
    io.stdout:write((failures == 0 and 'all passed' or (failures .. ' failed')) .. '\n')
    io.stdout:flush()
    os.exit(failures == 0 and 0 or 1)
  end
  return runner
end

return M
