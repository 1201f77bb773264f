#[slim_bus::stream("user.created")]
struct OnUserCreated;

fn main() {}
