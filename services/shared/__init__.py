"""What every service needs: settings base, logging, server builder, interceptors, errors."""
