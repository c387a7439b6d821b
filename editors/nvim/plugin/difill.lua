-- The :Difill command. Loading this file starts nothing: the server starts from
-- require('difill').setup{} (lazy.nvim calls it for you when the spec has `opts`).
if vim.g.loaded_difill then
  return
end
vim.g.loaded_difill = true

local subcommands = {
  enable = function(difill) difill.enable() end,
  disable = function(difill) difill.disable() end,
  toggle = function(difill) difill.toggle() end,
  trigger = function(difill) difill.trigger() end,
  stop = function(difill) difill.stop() end,
  restart = function(difill)
    difill.stop()
    vim.defer_fn(difill.enable, 200)
  end,
  status = function(difill) vim.notify(difill.status()) end,
}

vim.api.nvim_create_user_command('Difill', function(args)
  local name = args.fargs[1] or 'status'
  local action = subcommands[name]
  if not action then
    vim.notify(('difill: unknown subcommand %q (one of: %s)'):format(name,
      table.concat(vim.tbl_keys(subcommands), ', ')), vim.log.levels.ERROR)
    return
  end
  local difill = require('difill')
  if not difill.config then
    vim.notify("difill: call require('difill').setup{} first", vim.log.levels.ERROR)
    return
  end
  action(difill)
end, {
  nargs = '?',
  desc = 'difill: enable, disable, toggle, trigger, stop, restart or status',
  complete = function(lead)
    return vim.tbl_filter(function(name)
      return vim.startswith(name, lead)
    end, vim.tbl_keys(subcommands))
  end,
})
