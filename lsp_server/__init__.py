"""difill.lsp_server"""
